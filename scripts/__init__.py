"""SLMOps Deploy: ship a fine-tuned small language model to Foundry Local, converted and verified."""
