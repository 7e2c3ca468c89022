"""The command lines are generated from the config dataclasses (lm.cli): every field of every entry
point's config is a flag, documented, and a run's config.json given back with --config reproduces
the settings exactly."""

import dataclasses
import json
import types
import typing

import pytest
import tyro._docstrings

from benchmarks import __main__ as benchmarks_cli
from benchmarks import scale
from experiments import brittleness, compare_refusal, frozen_finetune, refusal_direction
from lm import zero_shot
from lm.cli import from_mapping, parse_config
from lm.errors import UserError
from repair import __main__ as repair_cli

REPAIR_REQUIRED = ["--compressed", "some/compressed", "--out", "some/out"]

# (name, parse_args, config class, argv every call needs, flag prefix of each nested config field:
# "" when its fields are flat)
ENTRY_POINTS = [
    ("compare_refusal", compare_refusal.parse_args, compare_refusal.CompareConfig, [], {"anchored": "anchored."}),
    (
        "repair",
        repair_cli.parse_args,
        repair_cli.RepairConfig,
        REPAIR_REQUIRED,
        {"aird": "", "targeted_cfg": "targeted.", "anchored_cfg": "anchored."},
    ),
    ("brittleness", brittleness.parse_args, brittleness.BrittlenessConfig, [], {}),
    ("frozen_finetune", frozen_finetune.parse_args, frozen_finetune.FrozenFinetuneConfig, [], {}),
    ("refusal_direction", None, refusal_direction.DirectionConfig, [], {}),
    ("zero_shot", zero_shot.parse_args, zero_shot._Args, [], {"cfg": ""}),
    ("benchmarks", benchmarks_cli.parse, benchmarks_cli.BenchmarkRun, [], {"settings": ""}),
    ("benchmarks.scale", scale.parse_args, scale.ScaleRun, [], {"cfg": ""}),
]

# Fields whose values are checked against a vocabulary: a valid non-default value for each.
VALID = {
    "variants": ("wanda:0.6",),
    "eval_sets": ("harmbench",),
    "methods": ("actsvd",),
    "settings": ("vanilla",),
    "zero_shot_tasks": ("rte",),
    "tasks": ("rte", "boolq"),
    "targets": ("q_proj",),
    "source": (-1, 3),
    "ranks": (4, 0.5),
    "fractions": (0.02,),
    "curve_fractions": (0.5,),
    "static_fractions": (0.5,),
    "repair_curve_fractions": (0.5,),
    "repair_static_fractions": (0.5,),
    "line_search": (0.5,),
    "compressed": "other/compressed",
    "out": "other/out",
    "only": ("snip",),
    "judges": ("arditi2024",),
}


def _direction_parse(argv):
    """refusal_direction's main parses and runs; this is its parse step alone."""
    return parse_config(refusal_direction.DirectionConfig, argv, prog="x", description="")[0]


def _leaves(cls, prefixes, prefix=""):
    """(attribute path, flag, field type, default) of every leaf field, nested configs expanded."""
    hints = typing.get_type_hints(cls, include_extras=True)
    default = cls()
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Annotated else kind
        if dataclasses.is_dataclass(base):
            for path, flag, t, d in _leaves(base, {}, prefix + prefixes.get(f.name, f.name + ".")):
                yield (f.name,) + path, flag, t, d
        else:
            yield (f.name,), "--" + prefix + f.name.replace("_", "-"), base, getattr(default, f.name)


def _other_value(name, kind, default, tmp_path):
    """A valid value different from the default, and the argv tokens that give it."""
    if name == "harmless_sets":
        path = tmp_path / "harmless.txt"
        path.write_text("Write a poem about the sea.\nName three fruits.\n")
        value = (f"file:{path}",)
    elif name in VALID:
        value = VALID[name]
    else:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        inner = args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind
        if typing.get_origin(inner) is typing.Literal:
            value = next(c for c in typing.get_args(inner) if c != default)
        elif inner is bool:
            value = not default if default is not None else True
        elif inner is int:
            value = 3 if default is None else default + 1
        elif inner is float or typing.get_origin(inner) in (typing.Union, types.UnionType):  # float, int | float
            value = 0.05 if not default else default / 2
        elif inner is str:
            value = "something-else"
        else:
            raise AssertionError(f"no test value for {name}: {kind}")
    return value, _tokens(value)


def _tokens(value):
    if isinstance(value, tuple):
        return [str(v) for v in value]
    return [str(value)]


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_every_config_field_is_a_flag_that_sets_it(entry, tmp_path):
    _, parse, cls, required, prefixes = entry
    parse = parse or _direction_parse
    leaves = list(_leaves(cls, prefixes))
    assert len(leaves) >= 6
    for path, flag, kind, default in leaves:
        value, tokens = _other_value(path[-1], kind, default, tmp_path)
        if kind is bool:  # a plain boolean is a flag pair; `bool | None` takes True / False / None
            # tyro negates a nested flag after its prefix: --anchored.no-strict
            negated = flag.replace("--", "--no-", 1) if "." not in flag else "{}.no-{}".format(*flag.rsplit(".", 1))
            argv = [flag if value else negated]
        else:
            argv = [flag, *tokens]
        given = {required[i]: required[i + 1] for i in range(0, len(required), 2)}
        given.pop(flag, None)
        extra = [t for kv in given.items() for t in kv]
        cfg = parse(extra + argv)
        got = cfg
        for part in path:
            got = getattr(got, part)
        assert got == value, (flag, got, value)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_every_config_field_has_its_own_help_line(entry):
    _, _, cls, _, prefixes = entry

    def classes(c):
        yield c
        for f in dataclasses.fields(c):
            hint = typing.get_type_hints(c, include_extras=True)[f.name]
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if dataclasses.is_dataclass(base):
                yield from classes(base)

    for c in classes(cls):
        docs = {f.name: tyro._docstrings.get_field_docstring(c, f.name, ()) for f in dataclasses.fields(c)}
        assert all(docs.values()), [n for n, d in docs.items() if not d]
        # A comment above a group of fields would be repeated as each one's help.
        assert len(set(docs.values())) == len(docs), f"{c.__name__}: fields share a help text"


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_a_runs_config_json_given_back_reproduces_its_settings(entry, tmp_path):
    _, parse, cls, required, prefixes = entry
    parse = parse or _direction_parse
    path, flag, _, _ = next(
        leaf for leaf in _leaves(cls, prefixes) if leaf[2] is str and leaf[0][-1] not in ("compressed", "out")
    )
    cfg = parse(required)
    file = tmp_path / "config.json"
    file.write_text(json.dumps(dataclasses.asdict(cfg)))  # JSON: tuples come back as lists
    assert parse(["--config", str(file)]) == cfg
    # a flag next to --config wins, and changes nothing else
    expected = dataclasses.asdict(cfg)
    target = expected
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = "other"
    assert dataclasses.asdict(parse(["--config", str(file), flag, "other"])) == expected


def test_yaml_config_with_nested_settings_and_the_quick_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("compressed: c\nout: o\naird:\n  window: 2\ntargeted_cfg:\n  objective: refusal\nn_asr: 12\n")
    cfg = repair_cli.parse_args(["--config", str(path), "--kl-max", "0.2"])
    assert (cfg.aird.window, cfg.aird.kl_max, cfg.targeted_cfg.objective, cfg.n_asr) == (2, 0.2, "refusal", 12)
    assert (
        cfg.targeted_cfg.reply_tokens == repair_cli.RepairConfig().targeted_cfg.reply_tokens
    )  # untouched nested fields kept

    quick = compare_refusal.parse_args(["--quick", "--n-asr", "5"])
    assert quick == dataclasses.replace(compare_refusal.CompareConfig.quick(), n_asr=5, name="quick-embedded")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"n_asr": 3, "nope": 1}', "unknown setting(s) nope"),
        ("[1, 2]", "must hold a mapping"),
        ("{not json", "cannot read config file"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(tmp_path, capsys, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert compare_refusal.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert compare_refusal.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_from_mapping_checks_nested_keys():
    with pytest.raises(UserError, match="aird: unknown setting"):
        from_mapping(repair_cli.RepairConfig(), {"aird": {"width": 3}})


def test_a_field_flag_is_never_read_as_an_abbreviated_preset():
    cfg = frozen_finetune.parse_args(["--q", "0.1"])  # `--q` is a prefix of `--quick`
    assert cfg.q == 0.1 and cfg == dataclasses.replace(frozen_finetune.FrozenFinetuneConfig(), q=0.1)


def test_a_main_jobs_config_json_gives_python_m_repair_its_repair_stage_settings(tmp_path):
    from experiments.compare_refusal.repairs import repair_config
    from repair.config import FROM_MAIN_JOB, MAIN_JOB_ONLY

    job = compare_refusal.parse_args(
        [
            "--size",
            "cpu",
            "--n-asr",
            "7",
            "--repair-max-new-tokens",
            "9",
            "--anchored.max-steps",
            "3",
            "--no-select-variants",
            "--seed",
            "4",
        ]
    )
    file = tmp_path / "config.json"
    file.write_text(json.dumps(dataclasses.asdict(job)))
    got = repair_cli.parse_args(["--config", str(file), *REPAIR_REQUIRED])
    stage = repair_config(job, tmp_path / "variant", tmp_path / "run")
    paths = dict(compressed="some/compressed", out="some/out", runs_dir=repair_cli.RepairConfig.runs_dir)
    assert got == dataclasses.replace(stage, **paths)
    assert (got.size, got.n_asr, got.max_new_tokens, got.anchored_cfg.max_steps, got.select_compressed, got.seed) == (
        "cpu",
        7,
        9,
        3,
        False,
        4,
    )
    # Every main-job setting is the repair's under the same name, renamed, or one the repair has no use for.
    repair_fields = {f.name for f in dataclasses.fields(repair_cli.RepairConfig)}
    for f in dataclasses.fields(compare_refusal.CompareConfig):
        assert f.name in MAIN_JOB_ONLY or FROM_MAIN_JOB.get(f.name, f.name) in repair_fields, f.name


def test_repair_sizes_give_cpu_defaults_without_flags(monkeypatch):
    from lm import sizes

    monkeypatch.setattr(sizes, "default_size", lambda: "cpu")
    cfg = repair_cli.parse_args(REPAIR_REQUIRED)
    assert (
        cfg.size,
        cfg.adv_suffix,
        cfg.zero_shot_limit,
        len(cfg.zero_shot_tasks),
        cfg.curve_fractions,
        cfg.select_compressed,
    ) == ("cpu", False, 24, 4, (), False)
    assert (
        repair_cli.parse_args([*REPAIR_REQUIRED, "--size", "cpu", "--adv-suffix"]).adv_suffix is True
    )  # a flag wins over its size
    with pytest.raises(UserError, match="invalid choice"):
        repair_cli.parse_args([*REPAIR_REQUIRED, "--size", "huge"])
