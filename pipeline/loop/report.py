"""The report of one ``cafe pipeline run``: ``<output>/report/report.md`` with PNG figures.

Sections: stage timeline (durations, skipped stages), each round's funnel and kept rows (with the oracle's
identity / instruction rates on the candidates when the world's oracle judged them), the evaluation table per
round, metric curves across rounds (``metrics.png``), and links to each round's samples.
"""
from __future__ import annotations

import io

from pipeline.loop.graph import STATE_DIR
from pipeline.store import Storage

CURVES = ("assistant.both", "assistant.identity", "assistant.instruction", "direct.both", "input.both", "t2i.both",
          "assistant.dino", "assistant.clip_t")


def _records(state: Storage) -> dict[str, dict]:
    return {name.removesuffix(".json"): state.read_json(f"{STATE_DIR}/stages/{name}")
            for name in state.list(f"{STATE_DIR}/stages") if name.endswith(".json")}


def write_loop_report(ctx, rounds: int) -> str:
    from pipeline.report import funnel_text

    state = ctx.state
    recs = _records(state)
    lines = [f"# CAFE loop: {ctx.cfg.run.name}", "", f"Output: `{ctx.out}` · rounds: {rounds}", "",
             "## Stage timeline", "", "| stage | finished | seconds |", "| --- | --- | --- |"]
    for name, rec in sorted(recs.items(), key=lambda kv: kv[1].get("finished", "")):
        lines.append(f"| {name} | {rec.get('finished', '')} | {rec.get('seconds', 0):.1f} |")
    lines += ["", "Stages are skipped on a re-run when their key is unchanged (`cafe pipeline plan` says why a stage "
                  "runs).", ""]
    metrics_by_round = []
    for r in range(rounds):
        b = recs.get(f"build-r{r}", {}).get("outputs", {})
        lines += [f"## Round {r}", ""]
        if b:
            manifest = Storage(b["dataset"]).read_json("manifest.json") or {}
            lines += [f"Dataset `{b['dataset']}/dataset`: {b['kept']} kept of {b['candidates']} candidates, "
                      f"{b['quarantined']} quarantined. Build report: `{b['dataset']}/report/report.md`.", "",
                      "```", funnel_text(manifest) if manifest.get("funnel") else "(no funnel)", "```", ""]
            oracle = _oracle_rates(Storage(b["dataset"]))
            if oracle:
                lines += [f"Oracle on the kept rows: identity kept {oracle['kept_identity']:.3f}, instruction "
                          f"followed {oracle['kept_instruction']:.3f} (n = {oracle['kept']}); on all candidates: "
                          f"identity {oracle['identity']:.3f}, instruction {oracle['instruction']:.3f} "
                          f"(n = {oracle['n']}).", ""]
        e = recs.get(f"eval-r{r}", {}).get("outputs", {})
        if e:
            table = Storage(e["report"]).read_bytes("table.md").decode()
            lines += ["Evaluation (`" + e["report"] + "`):", "", table, "",
                      f"![samples round {r}]({e['report']}/samples.png)", ""]
            from pipeline.loop.evaluate import headline

            split, flat = headline(e["metrics"])
            metrics_by_round.append(flat)
    if metrics_by_round:
        names = [m for m in CURVES if m in metrics_by_round[0]]
        lines += ["## Metrics across rounds", "", f"Oracle rates over the `{split}` pairs"
                  + (" (instructions that ask for something the input does not already show)" if split == "changing"
                     else "") + "; DINO and CLIP-T over all pairs.", "", "| metric | " + " | ".join(f"r{r}" for r in
                                                                              range(len(metrics_by_round))) + " |",
                  "| --- |" + " --- |" * len(metrics_by_round)]
        for m in names:
            lines.append(f"| {m} | " + " | ".join(f"{x.get(m, float('nan')):.3f}" for x in metrics_by_round) + " |")
        state.write_bytes("report/metrics.png", _curves_png(metrics_by_round, names))
        lines += ["", "![metrics across rounds](metrics.png)", ""]
        lines += _paired_lines(recs, rounds)
    state.write_bytes("report/report.md", "\n".join(lines).encode())
    return state.uri_of("report/report.md")


def _paired_lines(recs: dict, rounds: int) -> list[str]:
    """Paired comparisons on the `changing` pairs (the same pairs and seeds in every round): the assistant of
    each round against the previous round's and against each baseline of its round — difference ± paired s.e."""
    from pipeline.loop.evaluate import paired_difference, read_pairs

    pairs = [read_pairs(recs[f"eval-r{r}"]["outputs"]["report"]) if f"eval-r{r}" in recs else None
             for r in range(rounds)]
    if not any(pairs):
        return []
    out = ["## Paired comparisons (joint rate, `changing` pairs)", "",
           "| comparison | difference | paired s.e. | n | difference / s.e. |", "| --- | --- | --- | --- | --- |"]

    def row(label: str, p: dict, a: str, q: dict, b: str) -> None:
        keep = [i for i, c in enumerate(p["changing"]) if c]
        d, se, n = paired_difference([p[a][i] for i in keep], [q[b][i] for i in keep])
        out.append(f"| {label} | {d:+.3f} | {se:.3f} | {n} | {d / se if se and se == se else float('nan'):+.1f} |")

    for r, p in enumerate(pairs):
        if p is None:
            continue
        if r > 0 and pairs[r - 1] is not None and pairs[r - 1]["subject"] == p["subject"]:
            row(f"assistant r{r} − assistant r{r - 1}", p, "assistant.both", pairs[r - 1], "assistant.both")
        for base in ("direct", "t2i", "input"):
            if f"{base}.both" in p:
                row(f"assistant r{r} − {base} r{r}", p, "assistant.both", p, f"{base}.both")
    return out + [""]


def _oracle_rates(build: Storage) -> dict | None:
    import pyarrow as pa

    from pipeline.store import parquet_shards
    from training.data import schema as S

    shards = [build.read_parquet(k, columns=[S.KEEP, S.ORACLE_IDENTITY, S.ORACLE_INSTRUCTION])
              for k in parquet_shards(build, "candidates")]
    if not shards:
        return None
    t = pa.concat_tables(shards).to_pydict()
    ident, instr, keep = t[S.ORACLE_IDENTITY], t[S.ORACLE_INSTRUCTION], t[S.KEEP]
    if not ident or ident[0] is None:
        return None
    n, kept = len(ident), sum(bool(k) for k in keep)
    kid = sum(bool(i) for i, k in zip(ident, keep) if k)
    kin = sum(bool(i) for i, k in zip(instr, keep) if k)
    return {"n": n, "identity": sum(map(bool, ident)) / n, "instruction": sum(map(bool, instr)) / n,
            "kept": kept, "kept_identity": kid / kept if kept else float("nan"),
            "kept_instruction": kin / kept if kept else float("nan")}


def _curves_png(metrics: list[dict], names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in names:
        ax.plot(range(len(metrics)), [x.get(m) for x in metrics], marker="o", label=m)
    ax.set_xlabel("round")
    ax.set_xticks(range(len(metrics)))
    ax.set_ylabel("value")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
