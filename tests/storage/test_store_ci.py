""".ci/run makes the Mooncake Store tests run in CI: it installs the system libraries the wheel loads."""

import subprocess
from pathlib import Path


def test_ci_installs_the_librarys_system_packages_and_requires_these_tests(tmp_path):
    """.ci/run installs libibverbs1 and the libnl packages where libibverbs is missing (run here with stand-in
    ldconfig and apt-get), leaves them alone where present, and makes these tests required."""
    script = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    start = script.index('if [ -z "$(ldconfig -p')
    install = script[start:script.index("\nfi\n", start) + 4]
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    for installed in (False, True):
        listing = "\tlibibverbs.so.1 (libc6,x86-64) => /lib/libibverbs.so.1" if installed else "\tlibc.so.6"
        (bin_dir / "ldconfig").write_text(f"#!/bin/sh\nprintf '%b\\n' '{listing}'\n")
        for tool in ("apt-get", "ldconfig"):
            (bin_dir / tool).chmod(0o755)
        subprocess.run(["bash", "-euo", "pipefail", "-c", install], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                       check=True, capture_output=True)
        calls = log.read_text().splitlines() if log.exists() else []
        assert calls == ([] if installed else ["update -qq", "install -y -qq libibverbs1 libnl-3-200 "
                                                             "libnl-route-3-200"]), installed
        log.unlink(missing_ok=True)
    assert script.index("export ENGRAM_REQUIRE_MOONCAKE=1") < script.index('bash -c "${quickstart[1]}"')
