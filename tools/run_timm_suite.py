#!/usr/bin/env python
"""Run timm's own model test suite (``tests/test_models.py``) over the ``rb_*`` models.

Steps:

1. take the sdist of the *installed* timm version (``pip download --no-deps --no-binary :all:``
   into ``.cache/timm-sdist/``, reused when present) and extract only its ``tests/``;
2. copy those tests to a temporary folder that has no ``timm/`` source next to them, so the suite
   imports the installed timm, the one ``res_backbone`` registers its models into;
3. write random-weight checkpoints under the real torchvision / Hugging Face cache file names
   (:mod:`res_backbone.weights.testing`) and point ``TORCH_HOME`` / ``HF_HUB_CACHE`` at them, with
   ``HF_HUB_OFFLINE=1``, so the suite's pretrained tests go through our offline loading for real;
4. run pytest with ``TORCH_BACKEND=res_backbone`` (the suite imports that module before
   collecting) and :mod:`studies.timm_suite` as a plugin that keeps only the selected ``rb_*`` tests and adds
   them to the feature-API tests timm runs for its own ResNets (``JOINED_TESTS``: forward_intermediates, the
   features_only getter, pruning);
5. print passed / failed / skipped per test function; exit 1 on any failure.

Example::

    python tools/run_timm_suite.py --models 'rb_resnet18' 'rb_plain*' -k 'forward and not fx'

Exit status: 0 all selected tests passed or skipped, 1 a test failed or errored, 2 bad
arguments or nothing selected, 3 the timm sdist could not be obtained (no network).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from studies.timm_suite import (
    EXIT_NO_SDIST, FAKE_CACHE, MODELS_ENV, REPO, SDIST_CACHE, SdistUnavailable, extract_tests, fetch_sdist,
    installed_timm_version, print_summary, sdist_markers, select_models, summarise, weight_archs, write_fake_caches,
)

# ---------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run timm's tests/test_models.py (from the sdist of the installed timm) over res_backbone's "
        "rb_* models, with random-weight fake caches so the pretrained tests load offline.",
        epilog="Exit status: 0 passed, 1 a test failed, 2 bad arguments / nothing selected, 3 no timm sdist.",
    )
    p.add_argument("--models", nargs="+", default=["rb_*"], metavar="PATTERN",
                   help="shell patterns over the rb_* names registered with timm, e.g. 'rb_resnet18' 'rb_plain*' "
                   "(a tagged name such as rb_resnet18.a1_in1k selects only that pretrained config); default: rb_*")
    p.add_argument("-k", dest="keyword", metavar="EXPR",
                   help="passed to pytest -k to narrow further, e.g. 'forward and not fx'")
    p.add_argument("--keep-cache", action="store_true",
                   help=f"write the fake weight caches to {FAKE_CACHE.relative_to(REPO)}/, reuse the files already "
                   "there and keep them after the run (default: a temporary folder, deleted afterwards)")
    p.add_argument("--junit", type=Path, metavar="FILE", help="also write pytest's JUnit XML report to FILE")
    p.add_argument("--sdist", type=Path, metavar="PATH",
                   help="use this timm sdist (.tar.gz) or extracted source folder instead of downloading one "
                   f"into {SDIST_CACHE.relative_to(REPO)}/ (its version should equal the installed timm's)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    names = select_models(args.models)
    if not names:
        import timm

        print(f"no rb_* model matches {args.models}; registered: {', '.join(timm.list_models('rb_*'))}",
              file=sys.stderr)
        return 2
    version = installed_timm_version()
    try:
        sdist = args.sdist.resolve() if args.sdist else fetch_sdist(version)
        if sdist.is_dir():
            tests_src = sdist / "tests"
        else:
            tests_src = extract_tests(sdist, SDIST_CACHE / (sdist.name.removesuffix(".tar.gz") + "-tests"))
    except SdistUnavailable as e:
        print(f"timm's own suite NOT RUN (exit {EXIT_NO_SDIST}): {e}", file=sys.stderr)
        return EXIT_NO_SDIST

    work = Path(tempfile.mkdtemp(prefix="rb-timm-suite-"))
    try:
        # The suite runs from `work`, which holds a copy of tests/ and no timm/ source tree.
        run_dir = work / "suite"
        shutil.copytree(tests_src, run_dir / "tests")
        markers = "".join(f"    {m}\n" for m in sdist_markers(sdist))
        (run_dir / "pytest.ini").write_text(f"[pytest]\nmarkers =\n{markers}" if markers else "[pytest]\n")
        cache_root = FAKE_CACHE if args.keep_cache else work / "caches"
        env = dict(os.environ)
        env.update({k: str(v) for k, v in write_fake_caches(cache_root, weight_archs(names)).items()})
        env.update({
            "TORCH_BACKEND": "res_backbone",
            "HF_HUB_OFFLINE": "1",
            MODELS_ENV: ",".join(names),
            # tools/ (the plugin, studies.timm_suite) and the checkout's res_backbone; neither holds a timm/
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), str(REPO),
                                                        env.get("PYTHONPATH")])),
        })
        # The suite defines its pretrained tests only outside GitHub Actions (to spare downloads);
        # ours read local fakes, so keep them.
        env.pop("GITHUB_ACTIONS", None)
        junit = args.junit.resolve() if args.junit else work / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "studies.timm_suite",
               "-p", "no:cacheprovider", "-q", "-rfE", f"--junitxml={junit}"]
        if args.keyword:
            cmd += ["-k", args.keyword]
        print(f"timm {version} suite over {len(names)} names ({', '.join(names)})", flush=True)
        rc = subprocess.run(cmd, cwd=run_dir, env=env).returncode
        if not junit.is_file():
            print(f"pytest exited with {rc} before writing a report", file=sys.stderr)
            return rc or 1
        counts = summarise(junit)
        print_summary(counts, time.perf_counter() - t_start)
        if args.keep_cache:
            print(f"fake caches kept in {cache_root}")
        if rc == 5 or not counts:
            print("no test selected", file=sys.stderr)
            return 2
        failed = sum(c["failed"] for c in counts.values())
        return 1 if failed or rc not in (0, 5) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
