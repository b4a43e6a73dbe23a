"""Bad-input fuzzing: generated ``--set`` strings, YAML config files and feature folders.

Hypothesis draws malformed input of three kinds and checks one property for each: the
input is refused with one clear line, or it trains.

* ``--set`` strings: keys that are valid, mistyped, empty, dotted oddly or unicode, and
  YAML-ish values (huge integers, NaN / Inf spellings, lists, mappings, unbalanced
  brackets, tabs, tags, anchors, brackets nested hundreds deep).
* YAML config files: random mappings over the real sections and keys with values of the
  wrong type, mutated YAML text (tabs, colons, brackets, cut files), non-UTF-8 bytes.
* ``features`` folders in the real layout (README, ``equimodal.data.features``) with
  random defects: ragged and object rows, partial and whole-row NaN, Inf and 1e308,
  wrong dtypes (strings, complex, datetime, object), empty, cut and corrupt files, label
  files with blanks, non-integers, NaN, too many or too few classes, bad split and mask
  files, wrong row counts, odd modality names, bad loader options.

The library call (``build_config``, ``load_yaml``, ``load_dataset``) either succeeds or
raises the user-error class (``ConfigError``; ``ValueError`` / ``OSError`` for a folder)
with a one-line message naming the key, file or option. Through the CLI
(``equimodal train``) every case exits 0 having trained one tiny epoch, or exits 2 with
exactly one output line, ``error: <the library's message>``, no traceback, no run folder
and nothing written into the data folder. (A valid config whose hyper-parameters make
the loss NaN, e.g. ``optim.lr=1e300``, ends as the trainer documents it: exit 1, "training
diverged", the run folder kept with error.log; only the ``--set`` and YAML tests allow
it.)

Cases per run of the default suite (``derandomize=True``: the same cases every run):
250 + 30 + 150 + 20 + 200 + 30 = 680 generated, plus the explicit ``@example`` inputs
(each a bug found while writing this fuzzer); ``test_the_fuzzer_ran_at_least_500_cases``
counts them.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from equimodal.apps.cli import app
from equimodal.config import ConfigError, RunConfig, build_config, dump_config, load_yaml
from equimodal.core.registries import ENCODERS, FUSIONS, STRATEGIES
from equimodal.data.registry import get_entry, load_dataset

from .test_bad_inputs import snapshot

runner = CliRunner()

#: generated cases per test; the explicit examples come on top
EXAMPLES = {
    "set_library": 250,
    "set_cli": 30,
    "yaml_library": 150,
    "yaml_cli": 20,
    "folder_library": 200,
    "folder_cli": 30,
}
CASES: Counter[str] = Counter()


def fuzz(name: str):
    """The settings of one fuzz test: fixed cases, no deadline, no example database."""
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


#: one tiny epoch on a tiny model: what every CLI case that trains runs
TINY = [
    "train.epochs=1",
    "train.batch_size=16",
    "train.relative_edm=false",
    "train.device=cpu",
    "model.dim=8",
    "model.encoder.hidden=8",
    "model.encoder.depth=1",
    "train.shapley.permutations=4",
]
CLASSES = ("cat", "dog", "owl", "yak")


# --------------------------------------------------------------------------- checks
def one_line(message: str) -> bool:
    return len(message.splitlines()) == 1 and message.strip() == message and bool(message)


def message_of(err: BaseException) -> str:
    """What the CLI prints for ``err`` (its ``_message``): KeyError's argument, strerror."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {str(err.filename)!r}" if err.filename else "")
    return str(err)


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per generated case (hypothesis reruns the body: no tmp_path)."""
    folder = Path(tempfile.mkdtemp(prefix="equimodal-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The CLI draws a finished run's plots (a second each, and never fails a run): off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("equimodal.apps.cli._draw_plots", lambda run_dir: None, raising=False)
        yield


def invoke(argv: list[str]):
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert "Traceback" not in result.output, result.output
    return result


def check_refused(result, out: Path, expected: str | None = None) -> None:
    """Exit 2, one line ``error: ...`` (holding ``expected``), no run folder."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if expected is not None:
        assert lines[0] == f"error: {expected}", (lines[0], expected)
    assert not out.exists(), f"{out} was left behind: {sorted(map(str, out.rglob('*')))}"


def check_trained(result, out: Path, diverged_ok: bool = False) -> None:
    """Exit 0 with one finished run folder in ``out`` (or, if allowed, a diverged run)."""
    runs = sorted(out.iterdir()) if out.is_dir() else []
    assert len(runs) == 1, (result.output, runs)
    leftovers = [*out.rglob("*.tmp"), *out.rglob("*.partial")]
    assert not leftovers, leftovers
    if result.exit_code == 1 and diverged_ok:
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: training diverged"), result.output
        assert (runs[0] / "error.log").is_file()
        return
    assert result.exit_code == 0, result.output
    assert (runs[0] / "metrics.json").is_file(), sorted(p.name for p in runs[0].iterdir())


def check_config(config: RunConfig) -> None:
    """A config that validated: finite numbers, and it survives its own config.yaml."""

    def numbers(value: Any) -> Iterator[float]:
        if isinstance(value, dict):
            for v in value.values():
                yield from numbers(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from numbers(v)
        elif isinstance(value, float):
            yield value

    dumped = config.model_dump(mode="python")
    dumped["dataset"].pop("options")  # the loader's business, checked there
    assert all(math.isfinite(v) for v in numbers(dumped)), dumped
    again = build_config(yaml.safe_load(dump_config(config)))
    assert again.model_dump() == config.model_dump()


# --------------------------------------------------------------------------- config keys
def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def known_keys() -> list[str]:
    """Every key path a config has: sections, strategy, encoder and loader options."""
    keys: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            keys.add(prefix + name)
            sub = _model_of(info.annotation)
            if sub is not None and name != "strategy":
                walk(sub, f"{prefix}{name}.")

    walk(RunConfig, "")
    for strategy in STRATEGIES.names():
        keys.update(f"strategy.{k}" for k in STRATEGIES.get(strategy).config_class.model_fields)
    for _, entry in ENCODERS.items():
        for k in entry.options.model_fields:
            keys.update({f"model.encoder.{k}", f"model.encoders.a.{k}"})
    keys.update(f"dataset.options.{k}" for k in get_entry("features").option_names())
    keys.update({"model.encoder.kind", "model.encoders.a", "model.encoders.a.kind"})
    return sorted(keys)


KEYS = known_keys()
#: values a key may legitimately take: registered names, devices, loader choices
WORDS = sorted(
    {
        *STRATEGIES.names(),
        *FUSIONS.names(),
        *(name for name, _ in ENCODERS.items()),
        "features",
        "synthetic",
        "mfet",
        "auto",
        "cpu",
        "cuda",
        "adamw",
        "sgd",
        "cosine",
        "step",
        "batch",
        "epoch",
        "ema",
        "relu",
    }
)
#: YAML-ish text that has broken loaders: numbers at the edges, NaN / Inf spellings,
#: unbalanced brackets, tags, anchors, dates, control and line-separator characters
ODD_VALUES = [
    "",
    " ",
    "\t",
    "\t1",
    "~",
    "null",
    "true",
    "no",
    "on",
    ".nan",
    ".NaN",
    "nan",
    ".inf",
    "-.inf",
    "inf",
    "1e999",
    "1.0e+999",
    "-1.0e+999",
    "0",
    "-0",
    "-1",
    "0.5",
    "1.5",
    "0x10",
    "0o17",
    "0b101",
    "1_000",
    "+1",
    "3.4e+38",
    "1.0e+308",
    "1.0e-320",
    "99999999999999999999999",
    str(2**32),
    str(2**63),
    str(2**64),
    str(-(2**63) - 1),
    "[",
    "]",
    "{",
    "}",
    "[1, 2",
    "{a: 1",
    "[1, [2, [3]]]",
    "{a: {b: {c: 1}}}",
    "{kind: mlp, hidden: 8}",
    "{name: joint}",
    "[a, b]",
    "[]",
    "{}",
    "a: b",
    "- x",
    "? x",
    "'",
    '"',
    "'unterminated",
    '"\\0"',
    '"a\\x00b"',
    '"a\\nb"',
    "!!binary AA==",
    "!!binary @@",
    "!!python/object:os.system",
    "!!timestamp x",
    "!!float",
    "!!int abc",
    "!!bool x",
    "!!set {a}",
    "!!omap [a]",
    "&a [1]",
    "*a",
    "2001-01-01",
    "2001-13-45",
    "12:30:00",
    "%",
    "@",
    "`",
    "|",
    ">",
    "#comment",
    "a #comment",
    "\u2028",
    "\x85",
    "a\nb",
    "a\rb",
    "é",
    "名前",
    "\x00",
    "../../escape",
    "/abs/path",
    "a/b",
    ".",
    "..",
    "x" * 300,
    "[" * 600,
    "{a: " * 600,
]

yaml_values = st.one_of(
    st.sampled_from(ODD_VALUES),
    st.sampled_from(WORDS),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.3e}"),
    st.text(max_size=12),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=6,
    ).map(json.dumps),
)


def _mutated_key(key: str, suffix: str, how: int) -> str:
    parts = key.split(".")
    return [
        f"{key}.{suffix}",  # below a leaf
        ".".join([*parts[:-1], suffix]),  # a sibling that does not exist
        key.replace(".", ".."),  # an empty part
        key.upper(),
        key[:-1],  # one letter short
        f" {key} ",
        f"{key}.",
        f".{key}",
        key.replace("_", "-"),
    ][how]


keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS),
    st.builds(
        _mutated_key,
        st.sampled_from(KEYS),
        st.text(max_size=5),
        st.integers(min_value=0, max_value=8),
    ),
    st.lists(st.text(max_size=6), min_size=1, max_size=4).map(".".join),
)


def plausible_settings() -> list[str]:
    """``key=value`` with a valid value for every plain key of the config sections (its
    default, and for numbers and choices a few more): most random mixes stay valid."""
    from typing import Literal, get_args, get_origin

    found: set[str] = {f"strategy.name={name}" for name in STRATEGIES.names()}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            sub = _model_of(info.annotation)
            if name in ("strategy", "options", "encoders", "name") or "encoder" in prefix:
                continue
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            choices: list[Any] = [info.get_default(call_default_factory=True)]
            args = [a for a in (info.annotation, *get_args(info.annotation)) if a is not None]
            if any(get_origin(a) is Literal for a in args):
                choices += [c for a in args if get_origin(a) is Literal for c in get_args(a)]
            elif info.annotation is bool:
                choices += [True, False]
            elif info.annotation is int:
                choices += [1, 2, 3]
            elif info.annotation is float:
                choices += [0.5]
            found.update(f"{prefix}{name}={json.dumps(c)}" for c in choices)

    walk(RunConfig, "")
    found.update({"seed=7", "name=run-1", "model.encoder.dropout=0.2", "model.encoder.depth=2"})
    return sorted(found)


PLAUSIBLE = plausible_settings()
fuzzed = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", keys, yaml_values),
    st.builds(lambda k, v: f"{k}={v}", keys, yaml_values),
    st.builds(lambda k, v: f"{k}={v}", keys, yaml_values),
    st.text(max_size=24),  # often no "=" at all
    keys,
)
#: one to four settings, about half of them valid: the bad one may come anywhere
override_lists = st.lists(
    st.one_of(st.sampled_from(PLAUSIBLE), st.sampled_from(PLAUSIBLE), fuzzed),
    min_size=1,
    max_size=4,
)


def expected_config_error(base: dict, sets: list[str]) -> str | None:
    """The library's verdict: None for a valid config, else the ConfigError message."""
    try:
        check_config(build_config(base, sets))
    except ConfigError as err:
        message = str(err)
        assert one_line(message), repr(message)
        return message
    return None


# --------------------------------------------------------------------------- 1. --set
BUGS_SET = [
    # RecursionError escaped build_config (and the CLI, with a traceback)
    ["x=" + "[" * 600],
    ["model.encoders.a=" + "{a: " * 600],
    # PyYAML raises ValueError / AttributeError / IndexError / KeyError for some tags
    ["seed=2001-13-45"],
    ["seed=!!timestamp x"],
    ["train.epochs=!!float"],
    ["train.epochs=!!bool x"],
    # a NUL, a path or a too long name became (or broke) the run folder's path
    ["name=a\x00b"],
    ['name="a\\0b"'],
    ["name=/abs/path"],
    ["name=../escape"],
    ["name=" + "é" * 130],
    # a seed beyond 2**32 - 1 failed late (scikit-learn, torch) with their messages
    ["seed=99999999999999999999999"],
    # a width of 1e11 allocated terabytes: a RuntimeError traceback
    ["model.dim=100000000000"],
    # NaN and Inf validated and trained into NaN
    ["optim.lr=.inf"],
    ["model.memory.gate_bias=.nan"],
    ["strategy=ogm_ge", "strategy.alpha=.inf"],
    # a key with a line break made a two-line message
    ["model.encoders.a\nb=5"],
]


@fuzz("set_library")
@given(sets=override_lists)
@example(sets=["train.epochs=1"])
@example(sets=BUGS_SET[0])
@example(sets=BUGS_SET[1])
@example(sets=BUGS_SET[2])
@example(sets=BUGS_SET[3])
@example(sets=BUGS_SET[4])
@example(sets=BUGS_SET[5])
@example(sets=BUGS_SET[6])
@example(sets=BUGS_SET[7])
@example(sets=BUGS_SET[8])
@example(sets=BUGS_SET[9])
@example(sets=BUGS_SET[10])
@example(sets=BUGS_SET[11])
@example(sets=BUGS_SET[12])
@example(sets=BUGS_SET[13])
@example(sets=BUGS_SET[14])
@example(sets=BUGS_SET[15])
@example(sets=BUGS_SET[16])
def test_set_overrides_give_a_config_or_one_config_error(sets):
    CASES["set_library"] += 1
    expected_config_error({}, sets)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """A healthy features folder: 36 rows, 3 classes, modalities a (4 columns) and b (3)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_folder(root, healthy_folder(36, 3, {"a": 4, "b": 3}))
    return root


def cli_sets(root: Path) -> list[str]:
    """What every CLI case ends with: the tiny folder and a tiny model, one epoch."""
    return ["dataset.name=features", f"dataset.options.root={root}", *TINY]


def cap_strategy(base: dict, sets: list[str]) -> list[str]:
    """``sets`` plus caps on strategy options that would loop for long on valid input."""
    try:
        config = build_config(base, sets)
    except ConfigError:
        return sets
    caps = {"steps": 2, "anchor_epochs": 1, "max_orders": 4}
    return sets + [
        f"strategy.{k}={v}"
        for k, v in caps.items()
        if getattr(config.strategy, k, None) not in (None, v)
    ]


def library_run_verdict(base: dict, sets: list[str]) -> str | None:
    """What the CLI must print for ``base`` + ``sets``: None if the config, the data and
    the model are fine (then it trains), else the one-line message of the first error."""
    from equimodal.apps.cli import USER_ERRORS
    from equimodal.engine.trainer import build_model

    expected = expected_config_error(base, sets)
    if expected is not None:
        return expected
    config = build_config(base, sets)
    try:
        data = load_dataset("features", seed=config.seed, **config.dataset.options)
        build_model(config, data.info)
    except USER_ERRORS as err:
        message = message_of(err)
        assert one_line(message), repr(message)
        return message
    return None


def run_cli_case(root: Path, base_argv: list[str], base: dict, sets: list[str]) -> None:
    """The CLI agrees with the library: the same one-line error and exit 2, or a run."""
    with scratch() as tmp:
        out = tmp / "runs"
        expected = library_run_verdict(base, sets)
        before = snapshot(root)
        argv = ["train", "-q", "--out", str(out), *base_argv, *(f"--set={s}" for s in sets)]
        result = invoke(argv)
        assert snapshot(root) == before, "the data folder changed"
        if expected is not None:
            check_refused(result, out, expected)
        else:
            check_trained(result, out, diverged_ok=True)
            CASES["trained"] += 1


@fuzz("set_cli")
@given(sets=override_lists)
@example(sets=BUGS_SET[0])
@example(sets=BUGS_SET[3])
@example(sets=BUGS_SET[6])
@example(sets=BUGS_SET[8])
@example(sets=BUGS_SET[11])
@example(sets=BUGS_SET[12])
@example(sets=BUGS_SET[13])
@example(sets=["name=my-run"])
def test_set_overrides_through_the_cli_exit_0_or_2(sets, tiny_root):
    CASES["set_cli"] += 1
    # joint unless the case names another method: the quickest to train
    sets = ["strategy.name=joint", *sets, *cli_sets(tiny_root)]
    run_cli_case(tiny_root, [], {}, cap_strategy({}, sets))


# --------------------------------------------------------------------------- 2. YAML files
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(WORDS),
    st.dates(),
    st.binary(max_size=6),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), inner, max_size=3),
    ),
    max_leaves=5,
)


def _nest(path: str, value: Any) -> dict:
    node: Any = value
    for part in reversed(path.split(".")):
        node = {part: node}
    return node


def _merge(into: dict, other: dict) -> dict:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


@st.composite
def config_trees(draw) -> Any:
    """Mostly real sections and keys with values of any type; sometimes not a mapping."""
    kind = draw(st.integers(min_value=0, max_value=9))
    if kind == 0:
        return draw(values)  # a scalar, a list, a mapping of nonsense at the top
    tree: dict = {}
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        key = draw(st.one_of(st.sampled_from(KEYS), keys))
        _merge(tree, _nest(key, draw(values)))
    return tree


#: text that breaks YAML where it lands: tabs, colons, brackets, quotes, tags, anchors
BREAKERS = [
    "\t",
    ":",
    ": ",
    "[",
    "]",
    "{",
    "}",
    "'",
    '"',
    "&x ",
    "*x",
    "!!",
    "- ",
    "\n  ",
    "%",
    "@",
    "\x00",
    "\x85",
    "|\n",
    "? ",
]


@st.composite
def yaml_files(draw) -> bytes:
    """The bytes of a config file: a dumped tree, mutated YAML text, or raw bytes."""
    kind = draw(st.integers(min_value=0, max_value=7))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:  # another encoding, a byte-order mark, a stray byte
        text = yaml.safe_dump(draw(config_trees()), allow_unicode=True)
        return draw(
            st.sampled_from(
                [text.encode("utf-16"), b"\xef\xbb\xbf" + text.encode(), b"\xff" + text.encode()]
            )
        )
    text = yaml.safe_dump(draw(config_trees()), allow_unicode=True, default_flow_style=kind == 2)
    if kind >= 5:  # a few edits at random places
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            at = draw(st.integers(min_value=0, max_value=len(text)))
            edit = draw(st.sampled_from(["insert", "cut", "truncate"]))
            if edit == "insert":
                text = text[:at] + draw(st.sampled_from(BREAKERS)) + text[at:]
            elif edit == "cut":
                text = text[:at] + text[at + draw(st.integers(min_value=1, max_value=4)) :]
            else:
                text = text[:at]
    return text.encode("utf-8", "surrogatepass")


BUGS_YAML = [
    b"\xff\xfe: 1\n",  # not UTF-8: UnicodeDecodeError without the file's name
    "seed: 1\n".encode("utf-16"),
    b"seed: " + b"[" * 600 + b"]" * 600 + b"\n",  # RecursionError, traceback
    b"seed: 2001-13-45\n",  # ValueError from PyYAML's date constructor, no file named
    b"train: {epochs: !!float }\n",  # IndexError inside PyYAML, traceback
    b"name: !!binary YQBi\n",  # bytes 'a\0b' as the run name: ValueError traceback
    b"optim: {lr: .inf}\n",
    # an alias bomb: the error message repr'd a list of 9**6 items
    b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    b"e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\nseed: *f\n",
]


def yaml_verdict(path: Path) -> tuple[dict | None, str | None]:
    """(the tree, None), or (None, the ConfigError message) for a config file."""
    try:
        tree = load_yaml(path)
    except ConfigError as err:
        message = str(err)
        assert one_line(message) and str(path) in message, repr(message)
        return None, message
    return tree, None


@fuzz("yaml_library")
@given(content=yaml_files())
@example(content=BUGS_YAML[0])
@example(content=BUGS_YAML[1])
@example(content=BUGS_YAML[2])
@example(content=BUGS_YAML[3])
@example(content=BUGS_YAML[4])
@example(content=BUGS_YAML[5])
@example(content=BUGS_YAML[6])
@example(content=BUGS_YAML[7])
@example(content=b"")
def test_yaml_files_give_a_config_or_one_config_error(content):
    CASES["yaml_library"] += 1
    with scratch() as tmp:
        path = tmp / "run.yaml"
        path.write_bytes(content)
        tree, _ = yaml_verdict(path)
        if tree is not None:
            expected_config_error(tree, [])


@fuzz("yaml_cli")
@given(content=yaml_files())
@example(content=BUGS_YAML[0])
@example(content=BUGS_YAML[2])
@example(content=BUGS_YAML[4])
@example(content=BUGS_YAML[5])
@example(content=b"strategy: {name: joint, align_weight: 0.5}\nseed: 3\n")
def test_yaml_files_through_the_cli_exit_0_or_2(content, tiny_root):
    CASES["yaml_cli"] += 1
    with scratch() as tmp:
        path = tmp / "run.yaml"
        path.write_bytes(content)
        tree, error = yaml_verdict(path)
        if tree is None:  # the file itself is refused, before any --set
            out = tmp / "runs"
            argv = ["train", "-q", "--config", str(path), "--out", str(out)]
            check_refused(invoke(argv), out, error)
            return
        sets = cap_strategy(tree, cli_sets(tiny_root))
        run_cli_case(tiny_root, ["--config", str(path)], tree, sets)


# --------------------------------------------------------------------------- 3. folders
@dataclass
class Folder:
    """A features folder in memory; ``write_folder`` puts it on disk."""

    arrays: dict[str, np.ndarray]  # modality -> array (any dtype, any shape)
    suffix: dict[str, str]  # modality -> ".npy" | ".npz"
    labels: Any  # list of lines (labels.txt / .csv) or an array (labels.npy)
    labels_name: str = "labels.txt"
    split: list[str] | None = None
    mask: dict[str, np.ndarray] | None = None
    #: file name -> bytes, written last (corrupt, empty, cut files; stray files)
    raw: dict[str, bytes] = field(default_factory=dict)
    #: dataset.options besides root
    options: dict[str, Any] = field(default_factory=dict)
    #: file names removed after writing
    remove: tuple[str, ...] = ()
    note: str = ""

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints failing cases so
        printer.text(repr(self))

    def __repr__(self) -> str:  # what a failing case prints: short
        shapes = {m: (a.shape, str(a.dtype), self.suffix[m]) for m, a in self.arrays.items()}
        return (
            f"Folder({self.note!r}, arrays={shapes}, labels={self.labels_name}:"
            f"{list(self.labels)[:8]!r}, split={self.split and self.split[:8]}, "
            f"mask={self.mask and {k: v.dtype for k, v in self.mask.items()}}, "
            f"raw={ {k: v[:24] for k, v in self.raw.items()} }, options={self.options}, "
            f"remove={self.remove})"
        )


def healthy_folder(n: int, k: int, dims: dict[str, int], seed: int = 0) -> Folder:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    arrays = {m: rng.normal(size=(n, d)) + y[:, None] for m, d in dims.items()}
    return Folder(arrays, dict.fromkeys(dims, ".npy"), [CLASSES[c] for c in y])


def write_folder(root: Path, folder: Folder) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for m, array in folder.arrays.items():
        path = root / f"{m}{folder.suffix[m]}"
        if folder.suffix[m] == ".npz":
            np.savez(path, features=array)  # object arrays are pickled
        else:
            with open(path, "wb") as handle:  # np.save(path) would append .npy
                np.save(handle, array, allow_pickle=True)
    if isinstance(folder.labels, np.ndarray):
        with open(root / folder.labels_name, "wb") as handle:
            np.save(handle, folder.labels, allow_pickle=True)
    else:
        (root / folder.labels_name).write_text("\n".join(folder.labels) + "\n", encoding="utf-8")
    if folder.split is not None:
        (root / "split.txt").write_text("\n".join(folder.split) + "\n", encoding="utf-8")
    if folder.mask is not None:
        np.savez(root / "mask.npz", **folder.mask)
    for name, content in folder.raw.items():
        if name.endswith("/"):
            (root / name).mkdir(exist_ok=True)
        else:
            (root / name).write_bytes(content)
    for name in folder.remove:
        (root / name).unlink(missing_ok=True)


def npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f8", payload: bytes = b"\0" * 16) -> bytes:
    """A .npy whose header claims ``shape`` (huge, negative) over a few bytes of data."""
    import io

    from numpy.lib import format as npy_format

    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    npy_format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


#: names a modality file may have: fine ones, and ones a model cannot use
ODD_NAMES = ["c.d", "forward", "training", "keys", "_modules", "é x", "0", "a b", "LABELS"]
HUGE = [1e308, -1e308, 1e300, 3.4e38, 1e38, 1e30, 1e-320, 5e-324, -0.0]
DTYPES = [
    "float32",
    "float16",
    "int64",
    "int8",
    "uint8",
    "bool",
    "complex128",
    "U3",
    "M8[s]",
    "object",
    "longdouble",
]
SPLIT_WORDS = [
    "train",
    "val",
    "test",
    "",
    " train ",
    "Train",
    "tst",
    "validation",
    ":smile:",
    "test,x",
]
LABEL_TEXTS = [
    "",
    " ",
    "1.5",
    "nan",
    "-1",
    "99999999999999999999999",
    "cat ",
    "1,2",
    "名",
    ":cat:",
    "\x85",
]


@st.composite
def defects(draw, folder: Folder, n: int) -> tuple[str, Folder]:
    """One random defect of ``folder`` (a copy); its name says what it is."""
    mods = list(folder.arrays)
    m = draw(st.sampled_from(mods))
    x = folder.arrays[m]
    if not (x.ndim == 2 and x.size and x.dtype.kind in "biuf"):  # an earlier defect
        x = np.random.default_rng(n).normal(size=(n, 3))
    row = draw(st.integers(min_value=0, max_value=n - 1)) % x.shape[0]
    col = draw(st.integers(min_value=0, max_value=4)) % x.shape[1]
    arrays = dict(folder.arrays)
    kind = draw(
        st.sampled_from(
            [
                "partial_nan",
                "nan_rows",
                "inf",
                "huge",
                "dtype",
                "shape",
                "raw",
                "npz_keys",
                "container",
                "labels",
                "labels_npy",
                "labels_raw",
                "split",
                "mask",
                "options",
                "name",
                "stray",
            ]
        )
    )
    if kind == "partial_nan":
        y = x.astype(float)
        y[row, col] = np.nan
        arrays[m] = y
    elif kind == "nan_rows":  # whole rows NaN: absent samples (maybe all of them)
        y = x.astype(float)
        rows = draw(st.lists(st.integers(min_value=0, max_value=n - 1), max_size=n))
        y[[r % len(y) for r in rows]] = np.nan
        if draw(st.booleans()):
            y[:] = np.nan
        arrays[m] = y
    elif kind == "inf":
        y = x.astype(float)
        y[row, col] = draw(st.sampled_from([np.inf, -np.inf]))
        arrays[m] = y
    elif kind == "huge":
        y = x.astype(float)
        value = draw(st.sampled_from(HUGE))
        where = draw(st.sampled_from(["cell", "column", "row", "all"]))
        if where == "cell":
            y[row, col] = value
        elif where == "column":
            y[:, col] = value * draw(st.sampled_from([1.0, -1.0, np.linspace(0.5, 1, n)]))
        elif where == "row":
            y[row] = value
        else:
            y[:] = value
        arrays[m] = y
    elif kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES))
        if dtype in ("int64", "int8", "uint8", "bool"):
            arrays[m] = np.nan_to_num(x).astype(dtype)
        elif dtype == "M8[s]":
            arrays[m] = np.zeros(x.shape, dtype=dtype)
        elif dtype == "object":  # ragged rows, as numpy keeps them: pickled objects
            arrays[m] = np.array([list(r[: 1 + i % 3]) for i, r in enumerate(x)], dtype=object)
        else:
            with np.errstate(over="ignore"):  # float16 of a huge value: inf, fine here
                arrays[m] = x.astype(dtype)
    elif kind == "shape":
        shape = draw(
            st.sampled_from(
                ["fewer", "more", "transposed", "no_columns", "3d", "1d", "scalar", "no_rows"]
            )
        )
        arrays[m] = {
            "fewer": lambda: x[:-1],
            "more": lambda: np.vstack([x, x[:1]]),
            "transposed": lambda: x.T,
            "no_columns": lambda: x[:, :0],
            "3d": lambda: np.stack([x, x], axis=1),
            "1d": lambda: x[:, 0],
            "scalar": lambda: np.float64(1.0),
            "no_rows": lambda: x[:0],
        }[shape]()
        kind = f"shape:{shape}"
    elif kind == "raw":
        good = npy_bytes(x)
        content = draw(
            st.sampled_from(
                [
                    b"",
                    b"\x93NUMPY",
                    good[: draw(st.integers(min_value=1, max_value=len(good) - 1))],
                    b"PK\x03\x04" + b"\0" * 20,
                    npy_header((10**13, 4)),
                    npy_header((n, -4)),
                    npy_header((n, 4), "|O"),
                    b"\x80\x04K\x01.",  # a pickle
                ]
            )
            | st.binary(max_size=64)
        )
        folder = replace(folder, raw={**folder.raw, f"{m}{folder.suffix[m]}": content})
    elif kind == "npz_keys":
        many = {"x": x, "y": x} if draw(st.booleans()) else {}
        buffer_path = Path(tempfile.mkdtemp()) / "m.npz"
        np.savez(buffer_path, **many)
        folder = replace(folder, raw={**folder.raw, f"{m}.npz": buffer_path.read_bytes()})
        shutil.rmtree(buffer_path.parent)
        if folder.suffix[m] != ".npz":
            folder = replace(folder, remove=(*folder.remove, f"{m}{folder.suffix[m]}"))
    elif kind == "container":  # .npy bytes under .npz and the other way round
        suffix = dict(folder.suffix)
        suffix[m] = ".npz" if suffix[m] == ".npy" else ".npy"
        content = npy_bytes(x)
        if suffix[m] == ".npy":
            buffer_path = Path(tempfile.mkdtemp()) / "m.npz"
            np.savez(buffer_path, features=x)
            content = buffer_path.read_bytes()
            shutil.rmtree(buffer_path.parent)
        folder = replace(folder, raw={**folder.raw, f"{m}{suffix[m]}": content})
        folder = replace(folder, remove=(*folder.remove, f"{m}{folder.suffix[m]}"))
    elif kind == "labels":
        lines = (
            list(folder.labels)
            if not isinstance(folder.labels, np.ndarray)
            else [str(v) for v in folder.labels]
        )
        how = draw(
            st.sampled_from(
                ["set", "blank_end", "drop", "add", "one_class", "unique", "ints", "csv"]
            )
        )
        at = row % len(lines) if lines else 0
        if how == "set" and lines:
            lines[at] = draw(st.sampled_from(LABEL_TEXTS))
        elif how == "blank_end":
            lines = lines + ["", "  "]
        elif how == "drop" and lines:
            del lines[at]
        elif how == "add" and lines:
            lines.append(lines[at])
        elif how == "one_class":
            lines = [lines[0]] * len(lines)
        elif how == "unique":
            lines = [f"c{i}" for i in range(len(lines))]
        elif how == "ints":
            lines = [str(CLASSES.index(v) - 1) if v in CLASSES else v for v in lines]
        else:
            lines = [f"{v},extra" for v in lines]
            folder = replace(folder, labels_name="labels.csv")
        folder = replace(folder, labels=lines)
        kind = f"labels:{how}"
    elif kind == "labels_npy":
        y = np.array([CLASSES.index(v) if v in CLASSES else 0 for v in folder.labels], dtype=float)
        how = draw(
            st.sampled_from(
                [
                    "int",
                    "float",
                    "half",
                    "nan",
                    "inf",
                    "complex",
                    "bool",
                    "str",
                    "blank_str",
                    "2d",
                    "empty",
                    "object",
                ]
            )
        )
        value = {
            "int": lambda: y.astype(np.int64),
            "float": lambda: y,
            "half": lambda: y + 0.5,
            "nan": lambda: np.where(np.arange(len(y)) == row, np.nan, y),
            "inf": lambda: np.where(np.arange(len(y)) == row, np.inf, y),
            "complex": lambda: y.astype(complex),
            "bool": lambda: y.astype(bool),
            "str": lambda: np.array(folder.labels),
            "blank_str": lambda: np.where(np.arange(len(y)) == row, "", np.array(folder.labels)),
            "2d": lambda: y.reshape(-1, 1).repeat(2, axis=1),
            "empty": lambda: y[:0],
            "object": lambda: y.astype(object),
        }[how]()
        folder = replace(folder, labels=value, labels_name="labels.npy")
        kind = f"labels_npy:{how}"
    elif kind == "labels_raw":
        content = draw(
            st.sampled_from(
                [b"", b"\n\n", b"\xff\xfe\n" * n, "cat\u2028dog\n".encode(), b"\x00\n" * n]
            )
        )
        folder = replace(folder, raw={**folder.raw, folder.labels_name: content})
        if draw(st.booleans()):
            folder = replace(folder, remove=(*folder.remove, folder.labels_name))
    elif kind == "split":
        how = draw(
            st.sampled_from(["random", "good", "no_test", "no_train", "count", "word", "bytes"])
        )
        words = [("train", "train", "val", "test", "train")[i % 5] for i in range(n)]
        if how == "random":
            words = draw(st.lists(st.sampled_from(SPLIT_WORDS), min_size=n, max_size=n))
        elif how == "no_test":
            words = [w if w != "test" else "train" for w in words]
        elif how == "no_train":
            words = ["test"] * n
        elif how == "count":
            words = words[: draw(st.integers(min_value=0, max_value=n - 1))] or words + ["test"]
        elif how == "word":
            words[row] = draw(st.sampled_from(SPLIT_WORDS))
        if how == "bytes":
            folder = replace(folder, raw={**folder.raw, "split.txt": b"train\n\xff\n"})
        folder = replace(folder, split=words)
        kind = f"split:{how}"
    elif kind == "mask":
        how = draw(
            st.sampled_from(
                [
                    "random",
                    "all_false",
                    "key",
                    "length",
                    "float01",
                    "float_half",
                    "nan",
                    "str",
                    "bytes",
                    "nobody",
                ]
            )
        )
        present = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        mask = {
            "random": lambda: {m: present},
            "all_false": lambda: {m: np.zeros(n, dtype=bool)},
            "key": lambda: {"nope": present},
            "length": lambda: {m: present[:-1]},
            "float01": lambda: {m: present.astype(float)},
            "float_half": lambda: {m: np.where(present, 1.0, 0.5)},
            "nan": lambda: {m: np.where(present, 1.0, np.nan)},
            "str": lambda: {m: present.astype(str)},
            "bytes": lambda: {},
            "nobody": lambda: {k: np.arange(n) != row for k in mods},
        }[how]()
        folder = replace(folder, mask=mask)
        if how == "bytes":
            folder = replace(folder, raw={**folder.raw, "mask.npz": b"PK\x03\x04junk"})
        kind = f"mask:{how}"
    elif kind == "options":
        option = draw(
            st.sampled_from(["standardize", "modalities", "val_fraction", "test_fraction"])
        )
        value = draw(
            {
                "standardize": st.sampled_from([False, False, True, "no", 0, None]),
                "modalities": st.sampled_from(
                    [[], [mods[0]], mods[::-1], ["zz"], [1], mods[0], [mods[0]] * 2, None, "labels"]
                ),
                "val_fraction": st.sampled_from(
                    [0.0, 1.0, 0.5, -0.1, "x", None, True, 0.99, 1e-9, 0.3]
                ),
                "test_fraction": st.sampled_from(
                    [0.0, 1.0, 0.5, -0.1, "x", None, False, 0.99, 1e-9, 0.4]
                ),
            }[option]
        )
        folder = replace(folder, options={**folder.options, option: value})
        kind = f"options:{option}"
    elif kind == "name":
        name = draw(st.sampled_from(ODD_NAMES))
        if name not in arrays:
            arrays[name] = arrays.pop(m)
            folder = replace(
                folder,
                suffix={
                    **{k: v for k, v in folder.suffix.items() if k != m},
                    name: folder.suffix[m],
                },
            )
            if folder.mask and m in folder.mask:
                folder = replace(
                    folder, mask={(name if k == m else k): v for k, v in folder.mask.items()}
                )
        kind = f"name:{name}"
    else:  # stray files that are no modality, or a second file of one
        stray = draw(
            st.sampled_from(
                [
                    "README.md",
                    ".DS_Store",
                    "sub.npy/",
                    "notes.txt",
                    f"{m}.npz",
                    f"{m}.parquet",
                    "x.parquet",
                    "labels.npz",
                ]
            )
        )
        folder = replace(
            folder, raw={**folder.raw, stray: b"PAR1junk" if "parquet" in stray else b"junk"}
        )
        kind = f"stray:{stray}"
    return kind, replace(folder, arrays=arrays)


@st.composite
def folders(draw) -> Folder:
    """A healthy features folder with 0 to 3 random defects."""
    # mostly enough rows for the stratified hold-outs of up to 4 classes; sometimes too few
    n = draw(st.integers(min_value=30, max_value=60) | st.integers(min_value=3, max_value=29))
    k = draw(st.integers(min_value=2, max_value=4))
    mods = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    dims = {m: draw(st.integers(min_value=1, max_value=5)) for m in mods}
    folder = healthy_folder(n, k, dims, seed=draw(st.integers(min_value=0, max_value=3)))
    if draw(st.booleans()):
        folder = replace(folder, suffix={m: draw(st.sampled_from([".npy", ".npz"])) for m in mods})
    notes = []
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        note, folder = draw(defects(folder, n))
        notes.append(note)
    return replace(folder, note="+".join(notes) or "healthy")


def check_loaded(data, folder: Folder) -> None:
    """A folder that loaded is usable: finite float32, labels in range, a modality each."""
    import torch

    splits = (data.train, data.val, data.test)
    assert all(len(s) > 0 for s in (data.train, data.test)), [len(s) for s in splits]
    for split in splits:
        for m, x in split.features.items():
            assert x.dtype == torch.float32 and bool(torch.isfinite(x).all()), m
        if len(split):
            assert 0 <= int(split.labels.min()) <= int(split.labels.max()) < data.num_classes
        present = torch.stack([split.present[m] for m in data.modalities], 1)
        assert bool(present.any(1).all())


FOLDER_BUGS = {
    # each of these raised something else than a ValueError naming the file
    "npz_not_a_zip": {"raw": {"a.npz": b"PK\x03\x04junk"}},  # BadZipFile traceback
    "npz_holding_npy": {"raw": {"a.npz": "npy"}},  # TypeError, no file named
    "npy_holding_npz": {"raw": {"a.npy": "npz"}},  # AttributeError traceback
    "npy_huge_header": {"raw": {"a.npy": npy_header((10**13, 4))}},  # MemoryError traceback
    "npy_no_rows": {"arrays": {"a": np.ones((0, 4))}},  # reshape error, no file named
    "npy_no_columns": {"arrays": {"a": np.ones((36, 0))}},  # "every row is NaN"
    "labels_huge_int": {"label_row": (0, "99999999999999999999999")},  # OverflowError
    "labels_not_utf8": {"raw": {"labels.txt": b"\xff\xfe\n" * 36}},  # no file named
    "split_not_utf8": {"raw": {"split.txt": b"train\n\xff\n"}},
    "labels_blank_line": {"label_row": (5, "")},  # shifted every later label silently
    "labels_npy_nan": {"labels": np.where(np.arange(36) == 3, np.nan, np.arange(36) % 3)},
    "labels_npy_half": {"labels": np.arange(36) % 3 + 0.5},  # became class names
    "mask_not_a_zip": {"raw": {"mask.npz": b"PK\x03\x04junk"}},  # BadZipFile traceback
    "mask_empty": {"raw": {"mask.npz": b""}},  # EOFError traceback
    "mask_strings": {"mask": {"a": np.array(["x"] * 36)}},  # every sample "present"
    "mask_nan": {"mask": {"a": np.full(36, np.nan)}},
    "modalities_empty": {"options": {"modalities": []}},  # "need at least one array"
    "modalities_string": {"options": {"modalities": "ab"}},  # read as ['a', 'b']
    "fraction_text": {"options": {"val_fraction": "x"}},  # '<' not supported...
    "dotted_name": {"rename": "c.d"},  # torch: module name can't contain "."
    "torch_name": {"rename": "forward"},  # torch: attribute 'forward' already exists
    "two_files": {"raw": {"a.npz": "npz"}},  # a.npz silently replaced a.npy
    "huge_standardized": {"column": 1e308},  # overflow: NaN features, training diverged
    "huge_raw": {"column": 1e308, "options": {"standardize": False}},  # inf float32
    # found by the fuzzer: 3.4e38 fits float32 but not its square: training diverged
    "huge_raw_float32": {"column": 3.4e38, "options": {"standardize": False}},
    "outlier": {"cell": 1e308},  # z-score beyond float32 in a test row
    "absent_in_train": {"absent_train": True},  # no file named
}


def bug_folder(name: str) -> Folder:
    """The healthy 36-row folder with the damage ``FOLDER_BUGS[name]`` describes."""
    spec = FOLDER_BUGS[name]
    folder = healthy_folder(36, 3, {"a": 4, "b": 3})
    arrays = {**folder.arrays, **spec.get("arrays", {})}
    raw = {}
    for file, content in spec.get("raw", {}).items():
        if content == "npy":
            content = npy_bytes(arrays["a"])
        elif content == "npz":
            path = Path(tempfile.mkdtemp()) / "a.npz"
            np.savez(path, features=arrays["a"])
            content = path.read_bytes()
            shutil.rmtree(path.parent)
        raw[file] = content
    folder = replace(folder, arrays=arrays, raw=raw, options=spec.get("options", {}), note=name)
    if "label_row" in spec:
        row, text = spec["label_row"]
        folder.labels[row] = text
    if "labels" in spec:
        folder = replace(folder, labels=spec["labels"], labels_name="labels.npy")
    if "mask" in spec:
        folder = replace(folder, mask=spec["mask"])
    if "rename" in spec:
        folder.arrays[spec["rename"]] = folder.arrays.pop("b")
        folder.suffix[spec["rename"]] = folder.suffix.pop("b")
    if "column" in spec:
        folder.arrays["a"][:, 0] = spec["column"] * np.linspace(0.5, 1, 36)
    if "cell" in spec:
        folder.arrays["a"][35, 1] = spec["cell"]
        folder = replace(folder, split=["train"] * 20 + ["val"] * 6 + ["test"] * 10)
    if spec.get("absent_train"):
        folder.arrays["b"][:26] = np.nan
        folder = replace(folder, split=["train"] * 20 + ["val"] * 6 + ["test"] * 10)
    return folder


def library_verdict(root: Path, folder: Folder):
    """(data, None) or (None, the one-line message of the loader's error)."""
    before = snapshot(root)
    try:
        data = load_dataset("features", seed=0, root=str(root), **folder.options)
    except (ValueError, OSError) as err:
        message = message_of(err)
        assert one_line(message), repr(message)
        assert str(root) in message or message.startswith("dataset.options."), message
        assert type(err).__name__ not in ("UnicodeDecodeError", "UnicodeError"), message
        result = None, message
    else:
        check_loaded(data, folder)
        result = data, None
    assert snapshot(root) == before, "loading wrote into the data folder"
    return result


def _folder_examples(test):
    for name in FOLDER_BUGS:
        test = example(folder=bug_folder(name))(test)
    return test


@fuzz("folder_library")
@given(folder=folders())
@_folder_examples
def test_feature_folders_load_or_raise_one_line_naming_the_file(folder):
    CASES["folder_library"] += 1
    with scratch() as tmp:
        root = tmp / "data"
        write_folder(root, folder)
        library_verdict(root, folder)


@fuzz("folder_cli")
@given(folder=folders())
@example(folder=bug_folder("npz_not_a_zip"))
@example(folder=bug_folder("npy_huge_header"))
@example(folder=bug_folder("labels_huge_int"))
@example(folder=bug_folder("mask_empty"))
@example(folder=bug_folder("torch_name"))
@example(folder=bug_folder("huge_standardized"))
@example(folder=bug_folder("outlier"))
@example(folder=bug_folder("huge_raw_float32"))
@example(folder=healthy_folder(36, 3, {"a": 4, "b": 3}))
def test_feature_folders_through_the_cli_exit_0_or_2(folder):
    CASES["folder_cli"] += 1
    with scratch() as tmp:
        root = tmp / "data"
        write_folder(root, folder)
        _, expected = library_verdict(root, folder)
        config = tmp / "run.yaml"
        options = {"root": str(root), **folder.options}
        tree = {"dataset": {"name": "features", "options": options}, "strategy": {"name": "joint"}}
        config.write_text(yaml.safe_dump(tree), encoding="utf-8")
        out = tmp / "runs"
        before = snapshot(root)
        result = invoke(
            [
                "train",
                "-q",
                "--config",
                str(config),
                "--out",
                str(out),
                *(f"--set={s}" for s in TINY),
            ]
        )
        assert snapshot(root) == before, "the data folder changed"
        if expected is not None:
            check_refused(result, out, expected)
        else:
            check_trained(result, out)
            CASES["trained"] += 1


# --------------------------------------------------------------------------- not ours yet
# Bad input the fuzzer met whose fix belongs in files this test's authors do not own
# (equimodal/apps/cli.py, equimodal/models/encoders.py, equimodal/engine/build.py). Each
# test states the property; it is expected to fail until that fix lands.
def _train_refused(tmp_path: Path, *sets: str, root: Path | None = None) -> None:
    out = tmp_path / "runs"
    data = ["dataset.name=features", f"dataset.options.root={root}"] if root else []
    argv = ["train", "-q", "--out", str(out), *(f"--set={s}" for s in [*TINY, *data, *sets])]
    check_refused(invoke(argv), out)


def test_a_device_that_is_not_there_is_one_line(tmp_path, tiny_root):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _train_refused(tmp_path, "train.device=cuda", root=tiny_root)


def test_an_encoder_too_wide_to_allocate_is_one_line(tmp_path, tiny_root):
    _train_refused(tmp_path, "model.encoder.hidden=100000000000", root=tiny_root)


def test_emoji_codes_in_an_error_are_printed_as_written(tmp_path):
    root = tmp_path / "data"
    folder = healthy_folder(36, 3, {"a": 4, "b": 3})
    write_folder(root, replace(folder, split=["train"] * 3 + [":smile:"] + ["test"] * 32))
    _, expected = library_verdict(root, folder)
    out = tmp_path / "runs"
    argv = ["train", "-q", "--out", str(out), *(f"--set={s}" for s in TINY)]
    argv += ["--set=dataset.name=features", f"--set=dataset.options.root={root}"]
    check_refused(invoke(argv), out, expected)


# --------------------------------------------------------------------------- the count
def test_the_fuzzer_ran_at_least_500_cases():
    """Every fuzz test above ran in this session: together at least 500 cases, and some
    of the CLI cases trained (the "or it trains" half of the property was exercised)."""
    if not set(EXAMPLES) <= set(CASES):
        pytest.skip(f"only {sorted(CASES)} ran; the count needs the whole file")
    assert sum(EXAMPLES.values()) >= 500
    assert sum(CASES[name] for name in EXAMPLES) >= 500, dict(CASES)
    assert all(CASES[name] >= EXAMPLES[name] for name in EXAMPLES), dict(CASES)
    assert CASES["trained"] >= 10, dict(CASES)
