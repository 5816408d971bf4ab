"""The run config (pws_batch.batch.config): one typed object, one flag per field, fingerprinted from its fields."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from pws_batch.batch.config import RunConfig, RunError, _sections, add_flags, from_args
from pws_batch.cli import build_parser


def all_fields():
    return [(s.name, f) for s in _sections() for f in dataclasses.fields(s.type_cls)]


def other_value(f):
    """A value different from the field's default, of the field's kind, that a run would accept."""
    if f.metadata.get("action"):
        return None  # a switch: tested separately
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != f.default)
    special = {"models": "tiny", "ray_address": "127.0.0.1:6379", "actors": 3, "top_fraction": 0.5,
               "clip_weight": 0.25, "clap_weight": 0.75, "seed": 11, "crop_columns": 0, "keep": 2, "shard_size": 2,
               "target_clip": 0.3, "target_clap": 0.2}
    if f.name in special:
        return special[f.name]
    return f.default + 5


def test_every_field_has_one_distinct_flag_in_run_and_submit():
    flags = [f.metadata["flag"] for _, f in all_fields()]
    assert len(flags) == len(set(flags))
    parser = build_parser()
    for command in ("run", "submit"):
        sub = parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001 - the real parser, read back
        options = {o for a in sub._actions for o in a.option_strings}  # noqa: SLF001
        assert set(flags) <= options, set(flags) - options


@pytest.mark.parametrize("section, name", [(s, f.name) for s, f in all_fields() if not f.metadata.get("action")])
def test_each_flag_sets_exactly_its_field(section, name):
    f = next(f for s, f in all_fields() if (s, f.name) == (section, name))
    value = other_value(f)
    args = build_parser().parse_args(["run", "m.parquet", "--out", "o", f.metadata["flag"], str(value)])
    config = from_args(args)
    assert getattr(getattr(config, section), name) == value
    # nothing else changed
    default = RunConfig()
    for s, g in all_fields():
        if (s, g.name) != (section, name):
            assert getattr(getattr(config, s), g.name) == getattr(getattr(default, s), g.name), (s, g.name)


def test_switches():
    parse = build_parser().parse_args
    assert from_args(parse(["run", "m", "--out", "o", "--overwrite"])).plan.overwrite is True
    assert from_args(parse(["run", "m", "--out", "o", "--resume"])).plan.overwrite is False
    assert from_args(parse(["run", "m", "--out", "o"])).plan.overwrite is False
    assert from_args(parse(["run", "m", "--out", "o", "--no-grayscale-suffix"])).defaults.grayscale_suffix is False
    assert from_args(parse(["run", "m", "--out", "o"])).defaults.grayscale_suffix is True


def test_ranking_weights_reach_the_rule():
    """--ranking weighted used to be 0.5/0.5 whatever was asked: the weights are fields with flags now."""
    config = from_args(build_parser().parse_args(["run", "m", "--out", "o", "--ranking", "weighted",
                                                  "--clip-weight", "0.9", "--clap-weight", "0.1"]))
    assert (config.ranking.name, config.ranking.clip_weight, config.ranking.clap_weight) == ("weighted", 0.9, 0.1)


def test_fingerprint_holds_what_changes_the_dataset_and_nothing_else():
    fp = RunConfig().fingerprint()
    for key in ("defaults.num_candidates", "defaults.keep", "defaults.steps", "defaults.seed", "defaults.crop_columns",
                "defaults.grayscale_suffix", "engine.models", "engine.dtype", "engine.vocoder", "plan.shard_size",
                "ranking.name", "ranking.top_fraction", "ranking.clip_weight", "ranking.clap_weight"):
        assert key in fp, key
    for key in ("engine.device", "engine.micro_batch", "engine.actors", "engine.ray_address", "plan.overwrite"):
        assert key not in fp, key
    assert RunConfig().replace(ranking={"clip_weight": 0.3}).fingerprint() != fp
    assert RunConfig().replace(engine={"actors": 4, "micro_batch": 2}).fingerprint() == fp


def test_config_round_trips_as_json_and_as_pickle():
    config = RunConfig().replace(engine={"models": "tiny", "actors": 2}, ranking={"name": "pareto"},
                                 defaults={"num_candidates": 3})
    assert RunConfig.from_dict(config.to_dict()) == config
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize("argv, message", [
    (["--candidates", "0"], "--candidates must be >= 1"),
    (["--shard-size", "0"], "--shard-size must be >= 1"),
    (["--actors", "0"], "--actors must be >= 1"),
    (["--keep", "3", "--candidates", "2"], "--keep 3 is more than --candidates 2"),
    (["--top-fraction", "1.5"], "--top-fraction must be in (0, 1]"),
    (["--clip-weight", "0", "--clap-weight", "0"], "--clip-weight and --clap-weight must be"),
    (["--steps", "5000"], "--steps must be an integer in [1, 1000]"),
    (["--allow-guides", "s3://guides/", "--allow-guides", "bogus://x"], "--allow-guides bogus://x: no filesystem knows"),
])
def test_bad_values_are_refused_naming_the_flag(argv, message):
    with pytest.raises(RunError, match=None) as info:
        from_args(build_parser().parse_args(["run", "m", "--out", "o", *argv]))
    assert message in str(info.value)


def test_the_flow_takes_the_config_whole_and_prefect_validates_a_json_config_into_it():
    from flows.generate_dataset import generate_dataset

    config = RunConfig().replace(engine={"models": "tiny"}, plan={"shard_size": 2})
    params = generate_dataset.validate_parameters({"manifest": "m.parquet", "out": "o", "config": config.to_dict()})
    assert params["config"] == config and isinstance(params["config"], RunConfig)


def test_add_flags_can_add_a_subset():
    import argparse

    parser = argparse.ArgumentParser()
    add_flags(parser, sections=("engine",), only=("models",))
    assert {o for a in parser._actions for o in a.option_strings} == {"-h", "--help", "--models"}  # noqa: SLF001
