"""The image runs as a fixed non-root UID, the one the manifests and compose require, and
installs the locked versions."""

import os
import re

from deploy.files import DEPLOY, IMAGE_UID, ROOT, dockerfile_stages


def test_image_runs_as_a_fixed_non_root_user() -> None:
    final = dockerfile_stages(DEPLOY / "Dockerfile")[-1]
    users = [arguments for keyword, arguments in final.instructions if keyword == "USER"]
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), "a numeric UID: runAsNonRoot can only check those"
    assert int(uid) == IMAGE_UID != 0
    assert gid == str(IMAGE_UID)


def test_image_final_stage_installs_nothing_and_copies_the_built_virtualenv() -> None:
    builder, final = dockerfile_stages(DEPLOY / "Dockerfile")
    assert builder.base == final.base == "${PYTHON_IMAGE}", "one Python for the venv's links"
    runs = " ".join(arguments for keyword, arguments in final.instructions if keyword == "RUN")
    for installer in ("apt-get", "apt ", "apk ", "pip ", "gcc", "build-essential"):
        assert installer not in runs
    copies = [arguments for keyword, arguments in final.instructions if keyword == "COPY"]
    assert f"--from={builder.name} /opt/tollgate /opt/tollgate" in copies


def test_image_builder_installs_tollgate_with_the_locked_versions() -> None:
    builder = dockerfile_stages(DEPLOY / "Dockerfile")[0]
    runs = [arguments for keyword, arguments in builder.instructions if keyword == "RUN"]
    assert any(re.search(r"pip install .*-c requirements\.lock \.", run) for run in runs)


def test_build_context_keeps_what_the_image_copies() -> None:
    # Dockerfile.dockerignore leaves out everything ("*") and lets back in what it names.
    patterns = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in patterns
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for stage in dockerfile_stages(DEPLOY / "Dockerfile"):
        for keyword, arguments in stage.instructions:
            if keyword != "COPY" or "--from=" in arguments:
                continue
            *sources, _ = [word for word in arguments.split() if not word.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert any(source == k or source.startswith(k + "/") for k in kept), source


def test_entrypoint_is_an_executable_shell_script() -> None:
    entrypoint = DEPLOY / "docker-entrypoint.sh"
    assert entrypoint.read_text().startswith("#!/bin/sh\n")
    assert os.access(entrypoint, os.X_OK)
