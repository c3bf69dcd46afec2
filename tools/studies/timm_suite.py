"""timm's own model test suite over the ``rb_*`` models: the sdist, fake caches, the pytest plugin, the summary.

``tools/run_timm_suite.py`` drives it; this module is also the pytest plugin (``-p studies.timm_suite``)
loaded inside the suite's process.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
SDIST_CACHE = REPO / ".cache" / "timm-sdist"
FAKE_CACHE = REPO / ".cache" / "timm-suite-fake-weights"
MODELS_ENV = "RB_TIMM_SUITE_MODELS"  # how the runner tells the plugin half which names to keep
EXIT_NO_SDIST = 3


class SdistUnavailable(RuntimeError):
    """The timm sdist is neither cached nor downloadable."""


# ---------------------------------------------------------------------- pytest plugin half
# Loaded inside the pytest process with ``-p studies.timm_suite``; only used there.
def pytest_report_header(config) -> List[str]:
    import timm

    import res_backbone

    return [f"timm {timm.__version__} from {Path(timm.__file__).parent}",
            f"res_backbone from {Path(res_backbone.__file__).parent}"]


# timm's tests that select timm's ResNets, by module (``list_models(module=FEAT_INTER_FILTERS)``, which holds
# 'resnet') or by a hard-coded list of names, and that the rb_* models join: timm 1.0's feature API
# (forward_intermediates, the features_only getter, prune_intermediate_layers). Ours register from the
# module ``timm_compat``, not ``resnet``, so the runner adds them to the parametrisation here.
JOINED_TESTS = (
    "test_model_forward_intermediates", "test_model_forward_intermediates_features",
    "test_prune_intermediate_layers_contract", "test_prune_intermediate_layers_params_used",
    "test_forward_after_prune_intermediate_layers", "test_prune_to_stem_feature", "test_head_hidden_size",
)


def _selected_names() -> List[str]:
    return [n for n in os.environ.get(MODELS_ENV, "").split(",") if n and "." not in n]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc) -> None:
    """Add the selected rb_* names to the ``model_name`` parametrisation of :data:`JOINED_TESTS` (before
    pytest's own hook turns the ``parametrize`` marks into calls); other arguments take their first listed value."""
    if metafunc.function.__name__ not in JOINED_TESTS:
        return
    marks = metafunc.definition.own_markers
    for i, mark in enumerate(marks):
        argnames = mark.args[0] if mark.name == "parametrize" and mark.args else None
        names = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames or [])
        if not names or names[0] != "model_name":
            continue
        values = list(mark.args[1])
        present = {v[0] if len(names) > 1 else v for v in values}
        extra = [n for n in _selected_names() if n not in present]
        if len(names) > 1:  # e.g. (model_name, model_kwargs): the others as for timm's first entry ({})
            extra = [(n, *(type(v)() for v in values[0][1:])) for n in extra]
        marks[i] = pytest.mark.parametrize(mark.args[0], values + extra, **mark.kwargs).mark
        return


def pytest_collection_modifyitems(config, items) -> None:
    """Keep tests parametrised with a selected ``model_name`` (``rb_resnet18`` or ``rb_resnet18.<tag>``)."""
    import timm

    if str(config.rootpath) in str(Path(timm.__file__).resolve()):
        raise RuntimeError(f"the sdist's timm ({timm.__file__}) is imported, not the installed one")
    keep_names = set(filter(None, os.environ.get(MODELS_ENV, "").split(",")))
    keep, drop = [], []
    for item in items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("model_name")
        selected = isinstance(name, str) and (name in keep_names or name.split(".")[0] in keep_names)
        (keep if selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ---------------------------------------------------------------------- sdist
def installed_timm_version() -> str:
    from importlib.metadata import version

    return version("timm")


def fetch_sdist(version: str, cache_dir: Path = SDIST_CACHE) -> Path:
    """Return the path of ``timm-<version>.tar.gz`` in ``cache_dir``, downloading it if needed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob(f"timm-{version}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
           "-d", str(cache_dir), f"timm=={version}"]
    print(f"downloading the timm {version} sdist: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache_dir.glob(f"timm-{version}.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise SdistUnavailable(
            f"could not download the timm {version} sdist into {cache_dir} (pip exit {proc.returncode}):\n{tail}\n"
            f"put timm-{version}.tar.gz there by hand, or pass --sdist PATH"
        )
    return found[0]


def extract_tests(sdist: Path, dest: Path) -> Path:
    """Extract only ``<sdist>/tests/`` into ``dest/tests`` (reused if present); return that folder."""
    tests = dest / "tests"
    if (tests / "test_models.py").is_file():
        return tests
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tests-", dir=dest.parent))
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) >= 2 and parts[1] == "tests" and ".." not in parts and not Path(m.name).is_absolute():
                members.append(m)
        if not members:
            raise SdistUnavailable(f"{sdist} has no tests/ folder")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **kwargs)
    dest.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / Path(members[0].name).parts[0] / "tests", tests)
    shutil.rmtree(tmp, ignore_errors=True)
    return tests


def sdist_markers(sdist: Path) -> List[str]:
    """The pytest markers the sdist's ``pyproject.toml`` declares (read, not extracted)."""
    import tomllib

    try:
        if sdist.is_dir():
            text = (sdist / "pyproject.toml").read_bytes()
        else:
            with tarfile.open(sdist) as tar:
                member = next(m for m in tar.getmembers() if Path(m.name).parts[1:] == ("pyproject.toml",))
                text = tar.extractfile(member).read()
        return list(tomllib.loads(text.decode())["tool"]["pytest"]["ini_options"]["markers"])
    except (StopIteration, KeyError, OSError, tomllib.TOMLDecodeError):
        return []


# ---------------------------------------------------------------------- selection and caches
def select_models(patterns: Sequence[str]) -> List[str]:
    """``rb_*`` names registered with timm that match any shell pattern (tags allowed: ``rb_resnet18.a1_in1k``)."""
    import timm

    import res_backbone  # noqa: F401  (registers rb_*)

    names = timm.list_models("rb_*") + timm.list_models("rb_*", pretrained=True)
    return sorted({n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)})


def weight_archs(names: Sequence[str]) -> List[str]:
    """The catalogue archs whose files the selected models' pretrained tests read."""
    from res_backbone import get_arch
    from res_backbone.timm_compat import PREFIX

    archs = {get_arch(n.split(".")[0][len(PREFIX):])["weights"] for n in names}
    return sorted(a for a in archs if a)


def write_fake_caches(root: Path, archs: Sequence[str]) -> Dict[str, Path]:
    """Random-weight torchvision and timm caches for ``archs`` under ``root``; returns env vars."""
    from res_backbone.weights.catalogue import CATALOGUE
    from res_backbone.weights.testing import write_fake_timm_cache, write_fake_torchvision_cache

    torch_home, hf_cache = root / "torch", root / "huggingface" / "hub"
    by_source = defaultdict(set)
    for e in CATALOGUE:
        if e.arch in archs:
            by_source[e.source].add(e.arch)
    t0 = time.perf_counter()
    files = {}
    if by_source["torchvision"]:
        files.update(write_fake_torchvision_cache(torch_home, sorted(by_source["torchvision"])))
    if by_source["timm"]:
        files.update(write_fake_timm_cache(hf_cache, sorted(by_source["timm"])))
    print(f"fake pretrained caches: {len(files)} files for {', '.join(archs) or 'no archs'} "
          f"under {root} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return {"TORCH_HOME": torch_home, "HF_HUB_CACHE": hf_cache}


# ---------------------------------------------------------------------- results
def summarise(junit: Path) -> Dict[str, Dict[str, int]]:
    """``{test function: {"passed": n, "failed": n, "skipped": n}}`` from a JUnit XML report."""
    counts: Dict[str, Dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(junit).getroot().iter("testcase"):
        func = case.get("name", "?").split("[")[0]
        if case.find("failure") is not None or case.find("error") is not None:
            counts[func]["failed"] += 1
        elif case.find("skipped") is not None:
            counts[func]["skipped"] += 1
        else:
            counts[func]["passed"] += 1
    return dict(counts)


def print_summary(counts: Dict[str, Dict[str, int]], seconds: float) -> None:
    width = max([len(f) for f in counts] + [len("total")])
    print(f"\n{'test function':<{width}}  passed  failed  skipped")
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for func, c in counts.items():
        print(f"{func:<{width}}  {c['passed']:>6}  {c['failed']:>6}  {c['skipped']:>7}")
        for k in total:
            total[k] += c[k]
    print(f"{'total':<{width}}  {total['passed']:>6}  {total['failed']:>6}  {total['skipped']:>7}"
          f"   ({seconds:.0f} s)")
