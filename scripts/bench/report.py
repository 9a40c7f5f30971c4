#!/usr/bin/env python3
"""Benchmark report (outside the data flow): turns one scripts/bench.sh run directory
(results.jsonl + s4.txt/s5.txt) into the results block of BENCHMARKS.md: medians over the
repetitions and the ratio Chorus : each peer.

usage: report.py RUN_DIR BENCHMARKS.md
"""
import json
import math
import os
import statistics
import sys

START, END = "<!-- results:start -->", "<!-- results:end -->"
PEERS = ["ywebsocket", "hocuspocus", "ysweet"]
NAMES = {
    "chorus": "Chorus (/y, y-websocket protocol)",
    "chorus-native": "Chorus (/v1/ws, native)",
    "chorus-redis": "Chorus (/y, Redis backplane)",
    "chorus-flush30": "Chorus (/y, --flush-interval 30ms)",
    "ywebsocket": "y-websocket server",
    "hocuspocus": "Hocuspocus",
    "ysweet": "y-sweet",
}


def num(v):
    return v if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None


def med(rows, key):
    vals = [num(r.get(key)) for r in rows]
    vals = [v for v in vals if v is not None]
    return (statistics.median(vals), len(vals)) if vals else (None, 0)


def fmt(v, digits=1):
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def ratio(chorus, peer, higher_better):
    if chorus is None or peer is None or chorus == 0 or peer == 0:
        return "—"
    r = chorus / peer if higher_better else peer / chorus
    return f"{r:.1f}×"


def join_table(L, by, servers, reps):
    """The join storm: each server's time to the whole document and peak memory, against the
    floor (plain writes of as many bytes to as many sockets) measured in the same run."""
    rows = {s: by.get(("join", s), []) for s in servers}
    if not any(rows.values()):
        return
    floor = by.get(("join-floor", "floor"), [])
    floor_ms, _ = med(floor, "all_ms")
    first = next(r for rs in rows.values() for r in rs)
    mb = first.get("doc_bytes", 0) / 1e6
    L.append(f"### Join storm ({first.get('joiners', '?')} stock clients join a {mb:.1f} MB document at once)")
    L.append("")
    L.append("Each client sends sync step 1 with an empty state vector and is timed until it has "
             "received the whole document. Growth is the server's peak RSS (VmHWM, reset just "
             "before the storm) over its RSS before it. The floor is the time plain blocking "
             "writes take to push the same bytes to the same number of loopback sockets "
             "(bench_send_floor --join, readers in another process on the generator's core).")
    L.append("")
    L.append("| server | p50 ms | max ms | failed | RSS growth MB | growth ÷ document | p50 ÷ floor |")
    L.append("|---|---|---|---|---|---|---|")
    if floor:
        p50, _ = med(floor, "p50_ms")
        L.append(f"| floor: plain writes (every reader done / median reader) | {fmt(p50, 0)} | "
                 f"{fmt(floor_ms, 0)} | — | — | — | (denominator) |")
    for s in servers:
        rs = rows.get(s)
        if not rs:
            continue
        p50, n = med(rs, "p50_ms")
        mx, _ = med(rs, "max_ms")
        failed, _ = med(rs, "failed")
        growth, _ = med(rs, "rss_growth_mb")
        per_doc, _ = med(rs, "growth_per_doc")
        vs_floor = f"{p50 / floor_ms:.2f}" if p50 is not None and floor_ms else "—"
        note = "" if n in (0, reps) or reps == 0 else f" (n={n})"
        L.append(f"| {NAMES[s]} | {fmt(p50, 0)}{note} | {fmt(mx, 0)} | {fmt(failed, 0)} | "
                 f"{fmt(growth, 0)} | {fmt(per_doc, 2)} | {vs_floor} |")
    L.append("")


def main():
    run, out = sys.argv[1], sys.argv[2]
    rows = [json.loads(l) for l in open(os.path.join(run, "results.jsonl")) if l.strip()]
    by = {}
    for r in rows:
        if r.get("scenario") == "ingest" and num(r.get("server_cpu_s")) and r.get("edits"):
            # Unfinished runs: per edit delivered, not per edit sent.
            done = num(r.get("done_pct"))
            edits = r["edits"] * (done / 100 if done is not None else 1)
            if edits:
                r["cpu_us_per_edit"] = r["server_cpu_s"] * 1e6 / edits
        by.setdefault((r.get("scenario"), r.get("server")), []).append(r)
    machine = next((r for r in rows if r.get("scenario") == "machine"), {})
    versions = {r["server"]: r["version"] for r in rows if r.get("scenario") == "version"}
    # Earlier builds run for A/B (chorus@LABEL), in label order after the current one.
    for label in sorted({k[1] for k in by if str(k[1]).startswith("chorus@")}):
        NAMES.setdefault(label, f"Chorus build {label[len('chorus@'):]} (/y)")
    order = list(NAMES)
    order.sort(key=lambda s: (0 if s == "chorus" else 1 if s.startswith("chorus@") else 2))
    servers = [s for s in order if any(k[1] == s for k in by)]
    reps = max((len(v) for (sc, _), v in by.items() if sc in ("s1", "fanout", "join")), default=0)

    L = [START, ""]
    L.append(f"Run `{os.path.basename(run)}` — {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
             f"{machine.get('mem_mb', '?')} MB, Linux {machine.get('kernel', '?')}; load average at start "
             f"{machine.get('load', '?')} (a shared machine: other work may run beside the benchmark). "
             f"Medians of {reps} repetition(s) unless a cell says otherwise.")
    L.append("")
    L.append("| server | version |")
    L.append("|---|---|")
    for s in servers:
        L.append(f"| {NAMES[s]} | {versions.get(s, '?')} |")
    L.append("")

    def table(title, scenario, cols, note=""):
        if not any(by.get((scenario(s) if callable(scenario) else scenario, s)) for s in servers):
            return
        L.append(f"### {title}")
        L.append("")
        if note:
            L.append(note)
            L.append("")
        head = "| server | " + " | ".join(c[0] for c in cols) + " |"
        L.append(head)
        L.append("|---" * (len(cols) + 1) + "|")
        meds = {}
        for s in servers:
            rs = by.get((scenario(s) if callable(scenario) else scenario, s), [])
            if not rs:
                continue
            cells = []
            for (label, key, digits, _hb) in cols:
                v, n = med(rs, key)
                meds[(s, key)] = v
                cells.append(fmt(v, digits) + ("" if n in (0, reps) or reps == 0 else f" (n={n})"))
            L.append(f"| {NAMES[s]} | " + " | ".join(cells) + " |")
        L.append("")
        # Ratios: how many times better Chorus (/y) is than each peer, per column. No ratio
        # against a peer whose document came back empty (it did not persist it).
        has_chars = "characters" in [c[1] for c in cols]
        comparable = [p for p in PEERS if (p, cols[0][1]) in meds
                      and not (has_chars and meds.get((p, "characters")) != meds.get(("chorus", "characters")))]
        if comparable:
            parts = []
            for p in comparable:
                cells = [f"{c[0]} {ratio(meds.get(('chorus', c[1])), meds.get((p, c[1])), c[3])}"
                         for c in cols if c[3] is not None]
                parts.append(f"vs {NAMES[p]}: " + ", ".join(cells))
            L.append("Chorus advantage (×, >1 = Chorus better): " + "; ".join(parts))
            L.append("")

    table("Fan-out efficiency target (1 document, 50 readers, 2 writers × 50 updates/s)", "fanout", [
        ("server CPU ms / 1,000 deliveries", "base_cpu_ms_per_1k", 2, False),
        ("deliveries/s", "base_delivered_per_s", 0, True),
        ("p50 ms", "base_p50_ms", 2, False),
        ("p99 ms", "base_p99_ms", 2, False),
    ])
    floor = by.get(("floor", "floor"), [])
    one_per_write = [r for r in floor if r.get("messages_per_write") == 1]
    floor_cpu, _ = med(one_per_write, "cpu_ms_per_1k")
    if floor_cpu and any(by.get(("fanout", s)) for s in servers):
        parts = []
        for s in servers:
            v, _ = med(by.get(("fanout", s), []), "base_cpu_ms_per_1k")
            if v is not None:
                parts.append(f"{NAMES[s]} {v / floor_cpu:.2f}×")
        L.append("Fan-out CPU per delivery ÷ the floor's (one message per write, below): " + "; ".join(parts))
        L.append("")
    if floor:
        L.append("### The floor: plain writes in the fan-out's shape (bench_send_floor)")
        L.append("")
        L.append("The least any server can spend here: 50 loopback sockets, 100 updates/s of 32 B "
                 "each written to every socket by blocking `write`s, no framing, runtime or document; "
                 "readers in another process on the generator's core. Sender CPU measured like the servers'.")
        L.append("")
        L.append("| messages per write | sender CPU ms / 1,000 deliveries | deliveries/s |")
        L.append("|---|---|---|")
        for batch in sorted({r.get("messages_per_write") for r in floor}):
            rs = [r for r in floor if r.get("messages_per_write") == batch]
            cpu, n = med(rs, "cpu_ms_per_1k")
            rate, _ = med(rs, "deliveries_per_s")
            note = "" if n == reps else f" (n={n})"
            L.append(f"| {batch} | {fmt(cpu, 2)}{note} | {fmt(rate, 0)} |")
        L.append("")
    table("S1 typing rooms", "s1", [
        ("knee deliveries/s (p99 ≤ 50 ms)", "knee_delivered_per_s", 0, True),
        ("base p50 ms", "base_p50_ms", 2, False),
        ("base p99 ms", "base_p99_ms", 2, False),
        ("CPU ms / 1,000 deliveries (base)", "base_cpu_ms_per_1k", 2, False),
    ], "Deliveries = writer edits × receiving clients (cursor updates are sent but not counted). "
       "The knee is the highest step whose p99 ≤ 50 ms and that delivered ≥ 90 % of what was offered.")
    if any(k[0] == "s1-50" for k in by):
        table("S1 scaled: 50 typing rooms", "s1-50", [
            ("knee deliveries/s (p99 ≤ 50 ms)", "knee_delivered_per_s", 0, True),
            ("base p50 ms", "base_p50_ms", 2, False),
            ("base p99 ms", "base_p99_ms", 2, False),
            ("CPU ms / 1,000 deliveries (base)", "base_cpu_ms_per_1k", 2, False),
        ], "Same as S1 with 50 documents × 10 clients (base 4,500 deliveries/s), so that the steps "
           "find a knee on this shared machine.")
    table("S2 idle connections", "idle", [
        ("connections", "connections", 0, True),
        ("bytes / connection", "bytes_per_connection", 0, False),
        ("connect→synced p99 ms", "synced_p99_ms", 1, False),
        ("failed", "failed", 0, False),
    ])
    table("S3 large documents: ingest", "ingest", [
        ("edits/s", "edits_per_s", 0, True),
        ("inserts delivered, %", "done_pct", 1, None),
        ("server CPU µs / edit", "cpu_us_per_edit", 1, False),
        ("seconds", "seconds", 2, None),
        ("server RSS after, KB", "server_rss_kb", 0, False),
    ], "The trace streamed as one update per edit from one client while a second client waits "
       "for the last edit. A server that has not delivered it within the deadline has no rate; "
       "'inserts delivered' says how far it got, and its CPU per edit is per edit delivered.")
    for doc, title in (("b4", "S3 cold load of the trace's document"),
                       ("big", "S3 cold load of the 10× document (3.3 MB)"),
                       ("big50", "S3 cold load of the 50× document (18.3 MB, 5.5M characters)"),
                       ("big100", "S3 cold load of the 100× document (37.2 MB, 11.0M characters)")):
        key = f"load:{doc}"
        for s in servers:
            merged = [r for (sc, sv), v in by.items() if sv == s and sc and sc.startswith(key + "r") for r in v]
            if merged:
                by[(key, s)] = merged
        table(title, key, [
            ("ms to synced", "ms", 1, False),
            ("characters received", "characters", 0, None),
            ("state bytes", "bytes", 0, None),
            ("server RSS after, KB", "rss_after_kb", 0, False),
        ], "A fresh client syncs the document right after the server restarted; 'characters received' "
           "shows whether the server persisted it (0 = it did not survive the restart); ratios are "
           "given only against servers that gave back the whole document.")

    join_table(L, by, servers, reps)

    for name, title in (("s4.txt", "S4 slow readers (Chorus, bench_slow_readers)"), ("s5.txt", "S5 two nodes over Redis (Chorus, bench_redis)")):
        p = os.path.join(run, name)
        if os.path.exists(p):
            L.append(f"### {title}")
            L.append("")
            L.append("```")
            # Drop the nodes' log lines (the auth-off warning), keep the figures.
            L.extend(l.rstrip() for l in open(p) if l.strip() and "\x1b[" not in l and " WARN " not in l)
            L.append("```")
            L.append("")
    L.append(END)
    block = "\n".join(L)

    text = open(out).read() if os.path.exists(out) else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n" + block + "\n"
    open(out, "w").write(text)
    print(block)


if __name__ == "__main__":
    main()
