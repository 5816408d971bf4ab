"""`pws-batch inspect OUT`: a human summary of a dataset written by `pws-batch run`."""

from __future__ import annotations

from pws_batch.batch.dataset import Output, committed_shards, describe_scores


def summarize(uri: str) -> str:
    out = Output(uri)
    if not out.exists("run.json"):
        raise FileNotFoundError(f"{uri} holds no run.json: not a pws-batch dataset (or the run never started)")
    run = out.read_json("run.json")
    counts = run.get("counts", {})
    shards = committed_shards(out)
    planned = run.get("shards", {})
    lines = [
        f"dataset {uri} ({run.get('name')}): {run.get('status')}",
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

    table = read_kept(out, columns=["clip_score", "clap_score"])
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
    return "\n".join(lines)
