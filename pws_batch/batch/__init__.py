"""Many pairs on many machines: the manifest and its validation, the shard plan, the ranking rules, the Ray actors
and the dispatch to them, the dataset writer and its schema, the run's lifecycle (prepare, commit, resume, finalize).

Builds on `pws_batch.core`; never imports `flows` or the CLI (tests/test_layers.py enforces it).
"""
