"""Measured peers: other runtimes given the same weights, prompts and threads as the deployed model, so that
``invoke bench --peer NAME`` can say how our Foundry Local build compares. Peers are optional installs."""
