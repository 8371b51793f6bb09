"""The commands the README and the docs site show are the ones the code runs.

Every shell command shown in a ```bash / ```sh / ```console block, and every simple command shown inline in
backticks, is checked against the real thing without running any work: `sftops ...` parses with the CLI's own
parser, `make X` is a Makefile target, `python flows/x.py --flag` (and bench/, tests/) uses a flag that script
defines, `dvc`, `mlflow`, `mkdocs`, `prefect` and `torchrun` commands parse with their own parsers, and every
`section.key=value` given to `--set`, `-S` or a deployment's `overrides` is a key of the configuration whose value
loads. YAML snippets of params.yaml load as the configuration, Python snippets compile, every page is in the nav
of mkdocs.yml, and the README's links into docs/ (anchors included) resolve. `mkdocs build --strict` in
`make test` checks the links between the pages.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from sftops.cli import build_parser
from sftops.config import Config, leaf_fields, load_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# A command shown inline is checked when it starts with one of these (prose names other tools in passing).
INLINE_PROGRAMS = {"sftops", "make", "dvc", "python", "python3", "mlflow", "prefect", "mkdocs", "torchrun", "pytest"}
# What a placeholder stands for where its value matters; any other <placeholder> becomes the word PLACEHOLDER.
PLACEHOLDERS = {"<stage>": "train"}
SHELL_VARIABLES = {"$lr": "1e-4"}
SHELL_KEYWORDS_SKIPPED = {"for", "while", "if", "done", "fi", "else", "export", "cd", "source", "set"}


@dataclass(frozen=True)
class Shown:
    """One command as a page shows it."""

    page: str
    line: int
    argv: tuple[str, ...]
    fenced: bool  # in a code block: parses whole; inline in prose: may leave out a required argument

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join(self.argv)}"


# --- reading the pages ---------------------------------------------------------------------------------------


def _blocks(text: str) -> tuple[list[tuple[str, int, str]], str]:
    """The fenced code blocks as (language, first line number, body), and the prose with each block blanked."""
    blocks, prose, lines = [], [], text.split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(`{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            prose.append(lines[i])
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1))
        blocks.append((fence.group(2).lower(), i + 2, "\n".join(lines[i + 1 : end])))
        prose.extend([""] * (end - i + 1))
        i = end + 1
    return blocks, "\n".join(prose)


def _segments(command: str) -> list[list[str]]:
    """A shell line as its simple commands: split at ; && || | &, redirections and comments dropped."""
    for placeholder in re.findall(r"<[^<>\n]+>", command):
        command = command.replace(placeholder, PLACEHOLDERS.get(placeholder, "PLACEHOLDER"))
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current, tokens = [], [], list(lexer)
    skip_next = False
    for index, token in enumerate(tokens):
        if skip_next:  # a redirection's target
            skip_next = False
        elif token in {";", "&&", "||", "|", "&"}:
            segments.append(current)
            current = []
        elif token in {">", ">>", "<", ">&", "&>", "2>"}:
            skip_next = True
        elif token.isdigit() and tokens[index + 1 : index + 2] in ([">"], [">>"], [">&"]):
            continue  # the 2 of 2>&1
        else:
            current.append(token)
    segments.append(current)
    return [simple for simple in map(_simple, segments) if simple]


def _simple(tokens: list[str]) -> list[str]:
    """The command itself: environment assignments, `do`, `then` and `timeout N` in front dropped."""
    for variable, value in SHELL_VARIABLES.items():
        tokens = [t.replace(variable, value) for t in tokens]
    while tokens and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]) or tokens[0] in {"do", "then"}):
        tokens = tokens[1:]
    if tokens[:1] == ["timeout"]:
        tokens = tokens[2:]
    if not tokens or tokens[0] in SHELL_KEYWORDS_SKIPPED:
        return []
    return tokens


def _shell_lines(language: str, body: str) -> list[tuple[int, str]]:
    """(offset, command line) of a shell block: continuation lines joined; in console blocks only `$ ` lines."""
    out, pending, start = [], "", 0
    for offset, line in enumerate(body.split("\n")):
        if language == "console":
            if line.startswith("$ "):
                out.append((offset, line[2:]))
            continue
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


@cache
def shown_commands() -> tuple[Shown, ...]:
    """Every command the README and the docs pages show, in code blocks and inline."""
    found: list[Shown] = []
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        blocks, prose = _blocks(page.read_text())
        for language, first, body in blocks:
            if language in SHELL_LANGUAGES:
                for offset, line in _shell_lines(language, body):
                    found += [Shown(name, first + offset, tuple(s), True) for s in _segments(line)]
        for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
            text = " ".join(match.group(1).split())
            if "\n\n" in match.group(1) or " " not in text or text.split(" ", 1)[0] not in INLINE_PROGRAMS:
                continue  # prose, or a tool named in passing (`dvc`, `mlflow`)
            line = prose.count("\n", 0, match.start()) + 1
            for alternative in _alternatives(text):
                found += [Shown(name, line, tuple(s), False) for s in _segments(alternative)]
    return tuple(found)


def _alternatives(text: str) -> list[str]:
    """`sftops ingest|format|train` in prose means three commands."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if "|" in word and re.fullmatch(r"[\w-]+(\|[\w-]+)+", word):
            return [" ".join([*words[:i], choice, *words[i + 1 :]]) for choice in word.split("|")]
    return [text]


def _program(argv: tuple[str, ...]) -> str:
    return Path(argv[0]).name


def commands_of(*programs: str) -> list[Shown]:
    return [c for c in shown_commands() if _program(c.argv) in programs]


# --- the real parsers ----------------------------------------------------------------------------------------


def _placeholder_values(argv: list[str]) -> list[str]:
    """A one-letter placeholder (node K, N processes) stands for a number where the parser wants one."""
    out = []
    for token in argv:
        if re.fullmatch(r"[A-Z]", token):
            token = "1"
        out.append(re.sub(r"^(--[\w-]+=)[A-Z]$", r"\g<1>1", token))
    return out


def _argparse_error(parse) -> str | None:
    """Run an argparse-style parse; None if it parsed, else the error it printed."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse()
        except SystemExit as exc:
            return _last_line(err.getvalue()) or f"exit {exc.code}"
        except Exception as exc:  # dvc's parser raises its own error after logging the reason
            return _last_line(err.getvalue()) or repr(exc)
    return None


def _last_line(text: str) -> str:
    """argparse prints its usage, then the reason on the last line."""
    return ([line for line in text.splitlines() if line.strip()] or [""])[-1]


def _dvc_error(argv: list[str]) -> str | None:
    """dvc's own parser; it logs its reason (instead of printing it) before raising."""
    import logging

    from dvc.cli import parse_args

    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    logger = logging.getLogger("dvc.cli.parser")
    logger.addHandler(handler)
    try:
        error = _argparse_error(lambda: parse_args(argv))
    finally:
        logger.removeHandler(handler)
    return f"{logged.getvalue().strip()} ({error.strip()})" if error else None


def _tolerated(shown: Shown, error: str) -> bool:
    """Prose may name a command without its required arguments (`sftops reproduce`, `dvc exp push`)."""
    return not shown.fenced and ("arguments are required" in error or "Missing" in error)


def _sftops_error(shown: Shown, argv: list[str]) -> str | None:
    error = _argparse_error(lambda: build_parser().parse_args(_placeholder_values(argv)))
    return None if error is None or _tolerated(shown, error) else error


def _click_error(group, argv: list[str], shown: Shown) -> str | None:
    """Parse a click command line down to its leaf command, running nothing."""
    import click

    command, args, parent = group, list(argv), None
    try:
        while True:
            ctx = command.make_context(command.name, args, parent=parent, resilient_parsing=False)
            if not isinstance(command, click.Group):
                return None
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                return None
            _, command, args = command.resolve_command(ctx, rest)
            parent = ctx
    except click.MissingParameter as exc:
        return None if _tolerated(shown, "Missing") else str(exc)
    except click.ClickException as exc:
        return exc.format_message()


@cache
def _prefect_app():
    import prefect.cli  # noqa: F401  (registers the commands)
    from prefect.cli._app import _app

    return _app


def _prefect_error(shown: Shown, argv: list[str]) -> str | None:
    from cyclopts.exceptions import CycloptsError, MissingArgumentError

    try:
        _prefect_app().parse_args(argv, exit_on_error=False, print_error=False)
    except MissingArgumentError as exc:
        return None if _tolerated(shown, "Missing") else str(exc)
    except CycloptsError as exc:
        return str(exc)
    return None


@cache
def _make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, re.M))


@cache
def _script_flags(script: Path) -> frozenset[str]:
    """The flags a script's argparse defines; for a script without argparse, the flag-like strings it compares."""
    tree = ast.parse(script.read_text())
    flags = {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }
    if not flags:
        flags = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and str(n.value).startswith("-")}
    return frozenset(flags | {"-h", "--help"})


@cache
def _deployments() -> frozenset[str]:
    """flow-name/deployment-name of every deployment in prefect.yaml (the flow's name from its entrypoint)."""

    def flow(entrypoint: str) -> str:
        path, function = entrypoint.split(":")
        found = re.search(rf'@flow\(name="([^"]+)"[^\n]*\)\ndef {function}\(', (ROOT / path).read_text())
        return found.group(1)

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return frozenset(f"{flow(d['entrypoint'])}/{d['name']}" for d in config["deployments"])


@cache
def _config_keys() -> frozenset[str]:
    return frozenset(leaf_fields())


def _override_error(assignment: str) -> str | None:
    """A `section.key=value` override: the key exists and the value loads with the shipped params.yaml."""
    key = assignment.split("=", 1)[0].strip()
    if "=" not in assignment or key in {"KEY", "key"}:
        return None  # `--set key=value`, `-S ...` in prose: the syntax, not a setting
    if key not in _config_keys():
        return f"{key!r} is not a key of the configuration (sftops.config)"
    try:
        load_config(ROOT / "params.yaml", [assignment])
    except Exception as exc:
        return f"{assignment!r} does not load: {exc}"
    return None


def _overrides_in(argv: list[str]) -> list[str]:
    """The assignments a command passes as overrides: --set X, -S X, --set=X, --param overrides='[...]'."""
    out = []
    for flag, value in zip(argv, argv[1:]):
        if flag in {"--set", "-S", "--set-param"}:
            out.append(value)
        elif flag in {"--param", "--params"} and value.startswith("overrides="):
            out += json.loads(value.split("=", 1)[1])
    out += [t.split("=", 1)[1] for t in argv if t.startswith(("--set=", "-S="))]
    return out


# --- what each program's command must satisfy ----------------------------------------------------------------


def check(shown: Shown) -> list[str]:
    """The reasons a shown command does not match the code (empty: it matches)."""
    argv = list(shown.argv)
    program = _program(shown.argv)
    problems = [e for e in map(_override_error, _overrides_in(argv)) if e]
    if program == "sftops":
        problems += filter(None, [_sftops_error(shown, argv[1:])])
        if argv[1:2] == ["config"] and "--explain" in argv[:-1]:
            key = argv[argv.index("--explain") + 1]
            sections = {k.split(".")[0] for k in _config_keys()}
            if not key.isupper() and key not in _config_keys() and key not in sections:
                problems.append(f"sftops config --explain {key}: no such key or section")
    elif program == "make":
        targets = [t for t in argv[1:] if "=" not in t and not t.startswith("-")]
        problems += [f"make {t}: no such target in the Makefile" for t in targets if t not in _make_targets()]
    elif program in {"python", "python3"}:
        problems += _python_problems(shown, argv)
    elif program == "torchrun":
        problems += _torchrun_problems(shown, argv[1:])
    elif program == "dvc":
        error = _dvc_error(argv[1:])
        problems += [f"dvc: {error.strip()}"] if error and not _tolerated(shown, error) else []
    elif program == "mlflow":
        from mlflow.cli import cli

        problems += filter(None, [_click_error(cli, argv[1:], shown)])
    elif program == "mkdocs":
        from mkdocs.__main__ import cli

        problems += filter(None, [_click_error(cli, argv[1:], shown)])
    elif program == "prefect":
        problems += filter(None, [_prefect_error(shown, argv[1:])])
        if argv[1:3] == ["deployment", "run"] and len(argv) > 3 and argv[3] not in _deployments():
            problems.append(f"deployment {argv[3]!r} is not in prefect.yaml ({sorted(_deployments())})")
    elif program == "pytest":
        problems += [f"{p}: no such file" for p in argv[1:] if p.startswith("tests/") and not (ROOT / p).exists()]
    elif program == "docker" and argv[1:2] == ["run"]:
        inner = _docker_command(argv[2:])
        problems += check(Shown(shown.page, shown.line, tuple(inner), shown.fenced)) if inner else []
    elif program.endswith(".sh"):
        problems += [] if (ROOT / argv[0]).exists() else [f"{argv[0]}: no such script"]
    return problems


def _python_problems(shown: Shown, argv: list[str]) -> list[str]:
    if argv[1:2] == ["-c"]:
        try:
            compile(argv[2], "<python -c>", "exec")
        except SyntaxError as exc:
            return [f"python -c: {exc}"]
        return []
    if argv[1:3] == ["-m", "sftops"]:
        return check(Shown(shown.page, shown.line, ("sftops", *argv[3:]), shown.fenced))
    if argv[1:3] == ["-m", "torch.distributed.run"]:
        return _torchrun_problems(shown, argv[3:])
    if len(argv) < 2 or not argv[1].endswith(".py"):
        return []  # python -m venv, python -m pip: not ours
    script = ROOT / argv[1]
    if not script.exists():
        return [f"{argv[1]}: no such script"]
    if 'sys.argv = ["prefect", "deploy"' in script.read_text():  # flows/deploy.py hands its flags to prefect deploy
        return check(Shown(shown.page, shown.line, ("prefect", "deploy", *argv[2:]), shown.fenced))
    flags = {t.split("=", 1)[0] for t in argv[2:] if re.match(r"^--?[A-Za-z]", t)}
    return [f"{argv[1]} defines no flag {f}" for f in sorted(flags - _script_flags(script))]


def _torchrun_problems(shown: Shown, args: list[str]) -> list[str]:
    from torch.distributed.run import get_args_parser

    parsed = {}
    error = _argparse_error(lambda: parsed.setdefault("args", get_args_parser().parse_args(_placeholder_values(args))))
    if error:
        return [] if _tolerated(shown, error) else [f"torchrun: {error.strip()}"]
    ns = parsed["args"]
    if ns.module and ns.training_script == "sftops":
        return check(Shown(shown.page, shown.line, ("sftops", *ns.training_script_args), shown.fenced))
    return []


def _docker_command(args: list[str]) -> list[str]:
    """The command after `docker run [options] IMAGE`."""
    with_value = {"--gpus", "-e", "--env", "-v", "--volume", "-p", "--publish", "--name", "-w", "--workdir"}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in with_value else 1
    return args[i + 1 :]


# --- the tests -----------------------------------------------------------------------------------------------


def test_the_pages_show_commands_of_every_kind_checked():
    """The extraction finds what the pages show (a broken extractor would make every other test pass)."""
    counts = {p: len(commands_of(p)) for p in ("sftops", "make", "dvc", "mlflow", "prefect")}
    assert counts["sftops"] >= 10 and counts["make"] >= 10 and counts["dvc"] >= 15, counts
    assert counts["mlflow"] >= 4 and counts["prefect"] >= 6, counts
    assert any(c.argv[:2] == ("make", "pipeline") for c in shown_commands() if c.page == "README.md")
    assert any(c.argv[:2] == ("make", "test") for c in shown_commands() if c.page == "README.md")


def test_every_sftops_command_the_docs_show_parses_with_the_real_cli():
    shown = [*commands_of("sftops"), *[c for c in commands_of("python") if c.argv[1:3] == ("-m", "sftops")]]
    failures = [f"{c}\n    {p}" for c in shown for p in check(c)]
    assert not failures, "\n".join(failures)


def test_every_make_target_the_docs_show_is_in_the_makefile():
    failures = [f"{c}\n    {p}" for c in commands_of("make") for p in check(c)]
    assert not failures, "\n".join(failures)


def test_every_flag_given_to_a_project_script_is_one_the_script_defines():
    shown = [c for c in commands_of("python", "python3") if len(c.argv) > 1 and c.argv[1].endswith(".py")]
    assert any(c.argv[1] == "flows/sft_pipeline.py" for c in shown)
    failures = [f"{c}\n    {p}" for c in shown for p in check(c)]
    assert not failures, "\n".join(failures)


def test_every_dvc_command_the_docs_show_parses_with_dvc():
    failures = [f"{c}\n    {p}" for c in commands_of("dvc") for p in check(c)]
    assert not failures, "\n".join(failures)


def test_every_mlflow_mkdocs_prefect_and_torchrun_command_parses_with_its_own_cli():
    shown = [
        *commands_of("mlflow", "mkdocs", "prefect", "torchrun", "pytest", "docker"),
        *[c for c in commands_of("python", "python3") if c.argv[1:3] == ("-m", "torch.distributed.run")],
        *[c for c in shown_commands() if _program(c.argv).endswith(".sh")],
    ]
    failures = [f"{c}\n    {p}" for c in shown for p in check(c)]
    assert not failures, "\n".join(failures)


def test_every_params_key_set_on_a_command_line_exists_in_the_config():
    overrides = [(c, o) for c in shown_commands() for o in _overrides_in(list(c.argv))]
    assert len(overrides) >= 8, overrides
    failures = [f"{c}\n    {e}" for c, o in overrides if (e := _override_error(o))]
    assert not failures, "\n".join(failures)


def _deep_merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for key, value in change.items():
        both_sections = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _deep_merge(base[key], value) if both_sections else value
    return out


def test_every_params_snippet_the_docs_show_loads_as_the_configuration():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    sections = set(Config.model_fields)
    checked, failures = 0, []
    for page in PAGES:
        for language, line, body in _blocks(page.read_text())[0]:
            snippet = yaml.safe_load(body) if language in {"yaml", "yml"} else None
            if not isinstance(snippet, dict) or not set(snippet) <= sections:
                continue  # prefect.yaml's work_pool and the like
            checked += 1
            try:
                Config.model_validate(_deep_merge(params, snippet))
            except Exception as exc:
                failures.append(f"{page.relative_to(ROOT)}:{line}: {exc}")
    assert checked >= 3 and not failures, "\n".join(failures)


def test_every_python_snippet_the_docs_show_compiles():
    snippets = [
        (page, line, body)
        for page in PAGES
        for language, line, body in _blocks(page.read_text())[0]
        if language in {"python", "py"}
    ]
    assert snippets
    for page, line, body in snippets:
        compile(body, f"{page.relative_to(ROOT)}:{line}", "exec")


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return [p for item in nav for p in _nav_pages(item)]


def test_every_docs_page_is_reachable_from_the_mkdocs_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def _anchors(page: Path) -> set[str]:
    """The heading ids mkdocs gives a page: markdown's toc slugs, or an explicit {#id}."""
    from markdown.extensions.toc import slugify

    anchors = set()
    for line in _blocks(page.read_text())[1].split("\n"):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            explicit = re.search(r"\{#([\w-]+)\}\s*$", heading.group(1))
            text = re.sub(r"[`*_]", "", heading.group(1))
            anchors.add(explicit.group(1) if explicit else slugify(text, "-"))
    return anchors


def test_the_readme_links_to_docs_pages_and_anchors_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert {target for target, _ in links} >= {"docs/data.md", "docs/index.md", "docs/benchmarks.md"}
    for target, anchor in links:
        assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"
        assert not anchor or anchor in _anchors(ROOT / target), f"README links to {target}#{anchor}: no such heading"


def test_the_layout_page_includes_the_readme_layout_tree():
    readme = (ROOT / "README.md").read_text()
    assert "--8<-- [start:layout]" in readme and "--8<-- [end:layout]" in readme
    assert '--8<-- "README.md:layout"' in (ROOT / "docs" / "layout.md").read_text()


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize(
    "shown",
    [
        "sftops evaluate --nonsense",
        "sftops config --explain train.no_such_key",
        "make no-such-target",
        "python flows/sft_pipeline.py --no-such-flag",
        "dvc exp frobnicate",
        "dvc exp run -S train.no_such_key=1",
        "sftops run --set train.learning_rate=-1",
        "prefect deployment run sft-pipeline/no-such-deployment",
        "mlflow models serve --no-such-option",
        "python flows/deploy.py --no-such-option",
        "python -m torch.distributed.run --nnodes=2 -m sftops trian",
        "docker run --gpus all sftops sftops train --set train.no_such_key=1",
        "mkdocs biuld",
        "python -c 'print('",
    ],
)
def test_the_checks_catch_a_command_that_does_not_match_the_code(shown):
    assert check(Shown("example", 1, tuple(shlex.split(shown)), True))
