"""Printing of results for the terminal (rich)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def print_check(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"Foundry Local check: {result['model_id']}", show_header=False)
    table.add_row("listed", "yes" if result["listed"] else "NO")
    table.add_row("registration", result.get("registration", ""))
    table.add_row("load time", f"{result['load_seconds']:.2f} s")
    table.add_row("prompt", result["prompt"])
    table.add_row("answer", result["answer"])
    table.add_row("generation time", f"{result['first_answer_seconds']:.2f} s (first prompt); "
                                     f"{result['generate_seconds']:.1f} s for all prompts")
    if "accuracy_figure" in result:
        table.add_row("eval accuracy", result["accuracy_figure"])
    console.print(table)


def print_deploy_summary(console: Console, summary) -> None:
    console.print(f"[bold]Deployed {summary.model_id}[/bold] (recipe {summary.recipe})")
    console.print(f"  installed: {summary.installed}  ({_mb(summary.size_bytes)})")
    console.print(f"  steps run: {', '.join(summary.ran) or 'none'}; skipped (unchanged): "
                  f"{', '.join(summary.skipped) or 'none'}")
    if summary.check:
        print_check(console, summary.check)
