"""Printing of results for the terminal (rich), readable at any width and in a log file: a table that does not fit
the console (rich would squeeze its columns to a few characters each) is printed as records instead, one heading
per row and one ``column: value`` line per cell (:func:`print_rows`); Markdown tables get the same treatment
(:func:`print_markdown`)."""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

from rich.console import Console, Group
from rich.markdown import Markdown
from rich.table import Table
from rich.text import Text

from scripts.commands.compare_report import markdown_table
from scripts.proof.gate import describe as describe_fidelity
from scripts.proof.peer_bench import peer_markdown
from scripts.commands.tune import markdown as tune_markdown


def _table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for r in rows:
        table.add_row(*(Text(str(c)) for c in r))
    return table


def records(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Group:
    """The rows as records: each row's first cell as a heading, then one ``column  value`` line per other cell (a
    borderless grid: column names up to 28 characters wide, values wrapping under themselves)."""
    parts: list[Any] = [Text(title, style="italic")] if title else []
    for r in rows:
        parts.append(Text(str(r[0]) or "–", style="bold"))
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=1)  # the indent under the heading
        grid.add_column(max_width=28, overflow="fold")
        grid.add_column(overflow="fold")
        for h, c in zip(headers[1:], r[1:]):
            if str(c).strip():
                grid.add_row("", Text(str(h)), Text(str(c)))
        parts.append(grid)
    return Group(*parts)


def fits(console: Console, table: Table) -> bool:
    """True when ``table`` fits ``console`` without wrapping a cell (its natural width)."""
    natural = console.measure(table, options=console.options.update_width(100_000)).maximum
    return natural <= console.width


def print_rows(console: Console, title: str | None, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table when it fits the console's width unwrapped, else :func:`records`. Cells are plain text."""
    table = _table(title, headers, rows)
    console.print(table if fits(console, table) else records(title, headers, rows))


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _markdown_cells(line: str) -> list[str]:
    cells = [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(line.strip().strip("|"))]
    return [re.sub(r"\*\*(.*?)\*\*", r"\1", c).replace("`", "") for c in cells]


def print_markdown(console: Console, text: str) -> None:
    """Markdown, with each table in it printed by :func:`print_rows` (a table if it fits, else records)."""
    lines = text.splitlines()
    block: list[str] = []

    def flush() -> None:
        if "".join(block).strip():
            console.print(Markdown("\n".join(block)))
        block.clear()

    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            flush()
            headers = _markdown_cells(lines[i])
            i += 2
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(_markdown_cells(lines[i]))
                i += 1
            print_rows(console, None, headers, rows)
            continue
        block.append(lines[i])
        i += 1
    flush()


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
    if result.get("tools"):
        table.add_row("held-out tool cases", result["tools"]["figure"])
    if result.get("context"):
        table.add_row("context", result["context"])
    console.print(table)


def print_deploy_summary(console: Console, summary) -> None:
    console.print(f"[bold]Deployed {summary.model_id}[/bold] (recipe {summary.recipe})")
    console.print(f"  installed: {summary.installed}  ({_mb(summary.size_bytes)})")
    console.print(f"  steps run: {', '.join(summary.ran) or 'none'}; skipped (unchanged): "
                  f"{', '.join(summary.skipped) or 'none'}")
    if summary.fidelity:
        console.print(f"  fidelity vs FP32 ONNX (gate {'passed' if summary.fidelity['passed'] else 'FAILED'}): "
                      f"{describe_fidelity(summary.fidelity['figures'])}")
    if summary.check:
        print_check(console, summary.check)
    proof = getattr(summary, "proof", None) or {}
    if proof.get("validate"):
        for item in proof["validate"]["items"]:
            console.print(f"  {_STATUS[item['status']]} {item['key']}: {item['figure']}")
    if proof.get("report"):
        console.print(f"  report: {proof['report']}")


_STATUS = {"pass": "[green]PASS[/green]", "fail": "[red]FAIL[/red]", "skip": "[yellow]SKIP[/yellow]"}


def print_validate(console: Console, report) -> None:
    """One line per checklist item: status, title, figure."""
    console.print(f"[bold]Validate {report.model_id}[/bold] (profile {report.profile}, through Foundry Local)")
    for item in report.items:
        console.print(f"  {_STATUS[item.status]} {item.title}: {item.figure}")
    edge = next((i for i in report.items if i.key == "edge"), None)
    if edge:
        for case in edge.detail["cases"]:
            console.print(f"      {'ok  ' if case['passed'] else 'FAIL'} {case['name']}: {case['outcome']}")


def print_bench(console: Console, data: dict) -> None:
    """The per-backend table (figures at the shortest prompt) and the bandwidth bound."""
    bw = data["bandwidth"]
    short = data["backends"][0]["lengths"][0]["prompt_tokens"] if data["backends"] else 0
    headers = ("backend", "load s", "TTFT ms", "prefill tok/s", "decode tok/s", "ms/tok p50/p95", "peak RSS MB",
               "CPU %", "decode / bound", "threads", "load avg")
    rows = []
    for b in data["backends"]:
        x = b["lengths"][0]

        def s(summary, digits=1, scale=1.0):
            if not summary:
                return "–"
            return f"{summary['median'] * scale:.{digits}f} ±{50 * summary['spread']:.0f}%"
        tm = x["token_ms"] or {}
        frac = b["fraction_of_bound"]
        rows.append((b["label"], f"{b['load_seconds']:.2f}", s(x["ttft"], 1, 1000), s(x["prefill_tps"], 0),
                     s(x["decode_tps"], 1),
                     f"{tm.get('median', 0):.2f} / {x['token_ms_p95'] or 0:.2f}", f"{b['peak_rss_mb']:.0f}",
                     f"{x['cpu_percent'] or 0:.0f}",
                     f"{100 * frac:.2f} % of {b['bound_tps']:.0f} tok/s" if frac else "–",
                     str(b.get("threads") or "default"),
                     f"{b['load_average']['before'][0]:.1f} → {b['load_average']['after'][0]:.1f}"
                     if b.get("load_average") else "–"))
    print_rows(console, f"Bench {data['model_id']} (profile {data['profile']['name']}; medians ± half IQR; "
                        f"decode at a {short}-token prompt)", headers, rows)
    if data.get("peer"):
        print_markdown(console, "\n".join(peer_markdown(data)))
    per_token = ", ".join(f"{b['backend']} {b['bytes_per_token'] / 1e6:.2f} MB" for b in data["backends"])
    console.print(f"Memory read bandwidth {bw['gb_per_s']:.1f} GB/s (±{50 * bw['spread']:.0f}%); bound = bandwidth ÷ "
                  f"weight bytes read per token ({per_token}).")
    for note in data["notes"]:
        console.print(f"[dim]- {note}[/dim]")


def print_compare(console: Console, report) -> None:
    """`invoke compare`: the tutorial's table with measured figures, the graphs, the auto choice, and the files."""
    print_markdown(console, f"### {report.recipe}: every precision, measured\n\n" + markdown_table(report))
    console.print(f"[dim]Speed: medians of {report.profile['repeats']} runs (± half IQR) on a shared machine; "
                  "compare ratios, not absolutes.[/dim]")
    if report.quality_note:
        console.print(f"[bold]{report.quality_note}.[/bold]")
    for r in report.rows:
        if r.ok and r.weights_by_type:
            console.print(f"[dim]- {r.precision}: {r.graph}; weights {r.weights_by_type}[/dim]")
    for r in report.rows:
        if not r.ok:
            console.print(f"- {r.precision} {r.status}: {r.reason}")
    if report.smallest:
        console.print(f"Smallest precision that qualifies: [bold]{report.smallest['chosen']}[/bold] (eval accuracy ≥ "
                      f"{100 * report.smallest['threshold']:.0f} % of FP32's, fidelity thresholds met; `--precision auto` "
                      "also searches layouts):")
        for line in report.smallest["reasons"]:
            console.print(f"  - {line}")
    console.print("Saved " + ", ".join(report.files.values()))


def print_tune(console: Console, report: dict) -> None:
    """`invoke tune`: the search table, the winner and its recipe keys."""
    print_markdown(console, f"### {report['recipe']}: layouts, measured\n\n" + tune_markdown(report))
    if report["winner"]:
        console.print(f"Winner: [bold]{report['winner']}[/bold]. Recipe keys:")
        console.print_json(json.dumps(report["recipe_keys"]))
    else:
        console.print("[bold]No candidate meets every threshold[/bold]: keep a higher precision (`invoke compare`), "
                      "or try your own candidates (--candidates FILE).")
    console.print("Saved " + ", ".join(report["files"].values()))


def print_serve_check(console: Console, result: dict[str, Any]) -> None:
    """In-process vs HTTP (streamed, then non-streamed with the client's defaults): accuracy, agreement, speed."""
    cols = result["columns"]
    def fmt(x, digits=1):
        return "–" if x is None else f"{x:.{digits}f}"
    rows = []
    if any("accuracy_figure" in c for c in cols):
        rows.append(("eval accuracy", *(c.get("accuracy_figure", "–") for c in cols)))
    rows.append(("same answer as in-process", *(c.get("same_as_in_process", "–") for c in cols)))
    rows.append(("TTFT median ms", *(fmt(c["ttft_ms"]) for c in cols)))
    rows.append(("decode tok/s median", *(fmt(c["decode_tps"]) for c in cols)))
    rows.append(("request s median", *(fmt(c["request_s"], 3) for c in cols)))
    if result["questions"]:
        print_rows(console, f"invoke serve --check: {result['model_id']} at {result['base_url']} "
                            f"({result['questions']} questions; streamed and in-process capped at "
                            f"{result['max_tokens']} tokens)", ("", *(c["name"] for c in cols)), rows)
    else:  # a tools-only recipe: no questions, so no answer table to print
        console.print(f"invoke serve --check: {result['model_id']} at {result['base_url']} (no eval.dataset "
                      "questions; tool cases only)")
    for way, score in result.get("tools", {}).items():
        console.print(f"held-out tool cases, {way}: {score['figure']}")
    first = f" First question: {result['prompt']!r} → {result['answer']!r}" if result.get("prompt") else ""
    console.print(f"GET /v1/models: {', '.join(result['listed'])}.{first}")
    console.print("TTFT: request sent → first text. Decode tok/s: (completion tokens − 1) ÷ (last − first text piece); "
                  "when a model generates faster than the pieces are read (the tiny demo model), it measures delivery, "
                  "not the model.")
    console.print(f"The server stopped cleanly ({result['server'].get('stopped_by', '?')}).")
