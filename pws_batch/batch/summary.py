"""`pws-batch inspect OUT`: a human summary of a dataset written by `pws-batch run`."""

from __future__ import annotations

from pws_batch.batch.card import describe_scores
from pws_batch.batch.dataset import Output, read_run_json, verified_shards


def run_status(out: Output, run: dict) -> str:
    """run.json's status, but for a "running" one whose run is gone (its lease says): "interrupted (...)"."""
    status = run.get("status")
    if status == "running":  # is it? the lease says whether the run that wrote it is still alive
        from pws_batch.batch.lease import holder_state, read_lease

        held = read_lease(out)
        alive, who = holder_state(held) if held else (False, "")
        status = f"running ({who})" if alive else "interrupted (the run that wrote it is gone; run it again to resume)"
    return status


def summarize(uri: str) -> str:
    return summary(uri)[0]


def summary(uri: str) -> tuple[str, bool]:
    """`inspect`'s text, and whether the dataset is damaged (committed shards that do not match their markers)."""
    out = Output(uri)
    run = read_run_json(out)  # DatasetError (one line) when it is cut off
    if run is None:
        raise FileNotFoundError(f"{uri} holds no run.json: not a pws-batch dataset (or the run never started)")
    counts = run.get("counts", {})
    # sizes against the markers, not checksums: a checksum reads every part whole, media and all (a resume checks
    # those); a part cut short or missing is seen either way
    shards, broken = verified_shards(out, read=False)
    planned = run.get("shards", {})
    if not counts:  # finalize never wrote them (an interrupted run): what its committed shards say
        from pws_batch.batch.run import committed_counts

        counts = committed_counts({name: s for name, s in shards.items() if name in planned}, planned)
        if out.exists("rejected.parquet"):
            counts["rejected"] = out.read_table("rejected.parquet", columns=["row"]).num_rows
    status = run_status(out, run)
    if broken:
        status = (f"DAMAGED: {len(broken)} committed shard(s) do not match their markers (below; "
                  f"the run said: {status})")
    lines = [
        f"dataset {uri} ({run.get('name')}): {status}"
        + (f" ({run['error']})" if run.get("status") == "failed" and run.get("error") else ""),
        f"  manifest     {run.get('manifest')}",
        "  models       " + ", ".join(f"{k}={v}" for k, v in run.get("models", {}).items()),
        f"  shards       {len([s for s in shards if s in planned])}/{len(planned)} committed",
        f"  pairs        {counts.get('pairs_done', 0)} kept, {counts.get('pairs_failed', 0)} failed, "
        f"{counts.get('rejected', 0)} rejected rows, {counts.get('pairs_missing', 0)} not generated",
        f"  candidates   {counts.get('candidates', 0)} generated, {counts.get('kept', 0)} kept",
        f"  U-Net evals  {counts.get('unet_evals', 0)} ({counts.get('unet_evals_per_kept_pair') or 'n/a'} per kept "
        f"pair; {counts.get('pairs_stopped_early', 0)} pairs stopped early at their targets)",
    ]
    from pws_batch.batch.run import read_kept

    for name, problem in sorted(broken.items()):
        lines.append(f"  shard {name} does not match its marker: {problem}; run the same `pws-batch run` again "
                     f"to regenerate it")
    table = read_kept(out, ["clip_score", "clap_score"], list(shards))  # the scores only, never the media
    if table is not None:
        lines.append(f"  CLIP (kept)  {describe_scores(table.column('clip_score').to_pylist())}")
        lines.append(f"  CLAP (kept)  {describe_scores(table.column('clap_score').to_pylist())}")
    if out.exists("rejected.parquet"):
        rejected = out.read_table("rejected.parquet").to_pylist()
        for r in rejected[:10]:
            lines.append(f"  rejected row {r['row']}: {r['field']}: {r['reason']}")
        if len(rejected) > 10:
            lines.append(f"  ... and {len(rejected) - 10} more rejected rows (rejected.parquet)")
    for stats in shards.values():
        for f in stats.get("failed", []):
            lines.append(f"  failed pair {f['pair_id']} (row {f['row']}): {f['error']}")
    return "\n".join(lines), bool(broken)
