"""``tdapp build`` and ``tdapp measure`` on the copy DApp: reproducible, sensitive, atomic."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult

import tdapp.cli
from tdapp.builder import load_image
from tdapp.cli.build import build, image, images, measure
from tdapp.errors import ExitCode, IntegrityError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "copy_dapp"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
Cli = Callable[..., CliResult]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "home"))
    # Registered here too, so these tests do not depend on how cli/__init__ wires them.
    for command in (build, measure, images, image):
        monkeypatch.setitem(tdapp.cli.cli.commands, str(command.name), command)
    return tmp_path / "home"


def copy_app(target: Path, mtime: float | None = None) -> Path:
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("copy_files"))
    if mtime is not None:
        for path in [target, *target.rglob("*")]:
            os.utime(path, (mtime, mtime))
    return target


def built(cli: Cli, app: Path, name: str, *options: str) -> str:
    result = cli("build", app, "--name", name, *options)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 1 and HEX64.match(lines[0]), result.out
    return lines[0]


def error_line(result: CliResult, code: int) -> str:
    """The one ``tdapp: error:`` line, last on stderr (build output may come before)."""
    assert result.code == code, (result.code, result.err)
    errors = [line for line in result.err.splitlines() if line.startswith("tdapp: error: ")]
    assert len(errors) == 1, result.err
    assert result.err.splitlines()[-1] == errors[0]
    assert "Traceback" not in result.err and result.out == ""
    return errors[0]


def store_entries(home: Path) -> list[str]:
    return sorted(os.listdir(home / "images"))


def test_two_folders_with_different_mtimes_give_the_same_image(cli: Cli, tmp_path: Path,
                                                               home: Path) -> None:
    first = copy_app(tmp_path / "one" / "copy_dapp")
    second = copy_app(tmp_path / "somewhere" / "else" / "my_app", mtime=1_000_000_000)
    value_a = built(cli, first, "copy_a")
    value_b = built(cli, second, "copy_b")
    assert value_a == value_b
    binary_a = (home / "images" / "copy_a" / "rootfs" / "copy_files").read_bytes()
    binary_b = (home / "images" / "copy_b" / "rootfs" / "copy_files").read_bytes()
    assert binary_a == binary_b
    assert str(tmp_path).encode() not in binary_a  # no build path leaks into the binary


def test_measure_prints_the_built_value_every_time(cli: Cli, tmp_path: Path) -> None:
    value = built(cli, copy_app(tmp_path / "app"), "copy_demo")
    assert [cli("measure", "copy_demo").out for _ in range(2)] == [value + "\n"] * 2
    loaded = load_image("copy_demo")
    assert loaded.measurement == value
    assert loaded.entrypoint == ("/copy_files",)
    assert (loaded.heap, loaded.stack, loaded.mode) == (40 * 2**20, 4 * 2**20, "sim")
    assert [record.path for record in loaded.files] == ["copy_files"]


def test_the_users_folder_is_left_as_it_was(cli: Cli, tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app", mtime=1_234_567_890)

    def state() -> dict[str, tuple[int, int, bytes]]:
        return {str(path.relative_to(app)): (path.stat().st_mtime_ns, path.stat().st_mode,
                                             path.read_bytes()) for path in app.rglob("*")}

    before = state()
    built(cli, app, "copy_demo")
    assert state() == before


def test_a_one_byte_source_change_changes_the_measurement(cli: Cli, tmp_path: Path) -> None:
    original = built(cli, copy_app(tmp_path / "a"), "copy_demo")
    app = copy_app(tmp_path / "b")
    source = app / "copy_files.c"
    text = source.read_bytes()
    source.write_bytes(text.replace(b"the output is incomplete", b"the output is incomplete!"))
    assert built(cli, app, "copy_demo") != original


def test_limits_entrypoint_and_mode_change_the_measurement(cli: Cli, tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    baseline = built(cli, app, "copy_demo")
    variants = [("--heap", "41M"), ("--stack", "8M"), ("--mode", "hardware"),
                ("--entrypoint", "/copy_files /encryptedInputs /encryptedOutputs")]
    values = {built(cli, app, "copy_demo", *variant) for variant in variants}
    assert len(values) == len(variants) and baseline not in values
    assert built(cli, app, "copy_demo", "--heap", "40M", "--stack", "4096K") == baseline


def test_a_file_mode_changes_the_measurement(cli: Cli, tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    data = app / "data.txt"
    data.write_text("some data\n")
    data.chmod(0o644)
    plain = built(cli, app, "copy_demo")
    data.chmod(0o755)
    result = cli("build", app, "--name", "copy_demo")
    assert "2 executable files (/copy_files, /data.txt); choose one with --entrypoint" in \
        error_line(result, ExitCode.USAGE)
    assert built(cli, app, "copy_demo", "--entrypoint", "/copy_files") != plain


def test_a_modified_image_fails_measure(cli: Cli, tmp_path: Path, home: Path) -> None:
    value = built(cli, copy_app(tmp_path / "app"), "copy_demo")
    binary = home / "images" / "copy_demo" / "rootfs" / "copy_files"
    content = bytearray(binary.read_bytes())
    content[len(content) // 2] ^= 1
    binary.write_bytes(bytes(content))
    line = error_line(cli("measure", "copy_demo"), ExitCode.INTEGRITY)
    changed = re.search(r"measurement ([0-9a-f]{64}), recorded ([0-9a-f]{64})\)$", line)
    assert line.startswith("tdapp: error: image copy_demo was modified after it was built")
    assert changed is not None and changed.group(2) == value and changed.group(1) != value
    with pytest.raises(IntegrityError, match="was modified after it was built"):
        load_image("copy_demo")


@pytest.mark.parametrize("tamper", ["chmod", "extra file", "manifest heap"])
def test_any_change_in_the_store_is_seen(cli: Cli, tmp_path: Path, home: Path,
                                         tamper: str) -> None:
    built(cli, copy_app(tmp_path / "app"), "copy_demo")
    folder = home / "images" / "copy_demo"
    if tamper == "chmod":
        (folder / "rootfs" / "copy_files").chmod(0o775)
    elif tamper == "extra file":
        (folder / "rootfs" / "etc").mkdir()
        (folder / "rootfs" / "etc" / "ld.so.preload").write_text("/evil.so\n")
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["heap"] *= 2
        (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "was modified after it was built" in error_line(cli("measure", "copy_demo"),
                                                           ExitCode.INTEGRITY)


def test_a_failing_build_is_one_error_line_and_no_image(cli: Cli, tmp_path: Path,
                                                        home: Path) -> None:
    good = built(cli, copy_app(tmp_path / "good"), "copy_demo")
    app = copy_app(tmp_path / "bad")
    source = app / "copy_files.c"
    source.write_text(source.read_text().replace("return 0;\n}", "return 0\n}"))
    result = cli("build", app, "--name", "copy_demo", "-o", tmp_path / "t.yml")
    line = error_line(result, ExitCode.INPUT)
    assert f"build of {app} failed: make exited with status 2" in line
    assert "copy_files.c:" in line and "error: expected ';'" in line  # the compiler's reason
    assert "copy_files.c" in result.err  # the compiler's own output was shown
    # The image that was there is untouched, nothing half-made is left behind.
    assert cli("measure", "copy_demo").out.strip() == good
    assert store_entries(home) == [".lock", "copy_demo"]
    assert not (tmp_path / "t.yml").exists()
    result = cli("build", app, "--name", "fresh")
    error_line(result, ExitCode.INPUT)
    assert not (home / "images" / "fresh").exists()


def test_the_built_program_copies_folders_recursively(cli: Cli, tmp_path: Path,
                                                      home: Path) -> None:
    built(cli, copy_app(tmp_path / "app"), "copy_demo")
    program = home / "images" / "copy_demo" / "rootfs" / "copy_files"
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    (inputs / "sub" / "deeper").mkdir(parents=True)
    (inputs / "f1.txt").write_text("Hello world\n")
    (inputs / "sub" / "deeper" / "f2.bin").write_bytes(bytes(range(256)) * 1000)
    (inputs / "empty").mkdir()
    (inputs / "f1.txt").chmod(0o640)
    done = subprocess.run([program, inputs, outputs], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "copied 2 files" in done.stdout
    assert (outputs / "f1.txt").read_text() == "Hello world\n"
    assert (outputs / "sub" / "deeper" / "f2.bin").read_bytes() == bytes(range(256)) * 1000
    assert (outputs / "empty").is_dir()
    assert (outputs / "f1.txt").stat().st_mode & 0o777 == 0o640
    missing = subprocess.run([program, tmp_path / "nothing", outputs], capture_output=True,
                             text=True, check=False)
    assert missing.returncode == 1
    assert "nothing: cannot open input folder: No such file or directory" in missing.stderr


def test_image_txt_chooses_the_files(cli: Cli, tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    (app / "README").write_text("not for the image\n")
    (app / "share").mkdir()
    (app / "share" / ".hidden").write_text("kept: the folder is listed\n")
    (app / "image.txt").write_text("# the program and its data\n/copy_files\n\nshare/\n")
    built(cli, app, "copy_demo")
    paths = [record.path for record in load_image("copy_demo").files]
    assert paths == ["copy_files", "share/.hidden"]
    (app / "image.txt").write_text("copy_files\nmissing.bin\n")
    line = error_line(cli("build", app, "--name", "copy_demo"), ExitCode.INPUT)
    assert "image.txt line 2: missing.bin does not exist after the build" in line


def test_default_rule_leaves_out_sources_and_dot_files(cli: Cli, tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    (app / ".git").mkdir()
    (app / ".git" / "HEAD").write_text("ref\n")
    (app / "helper.h").write_text("")
    (app / "conf").mkdir()
    (app / "conf" / "settings.json").write_text("{}")
    built(cli, app, "copy_demo")
    assert [r.path for r in load_image("copy_demo").files] == ["conf/settings.json",
                                                               "copy_files"]
    (app / "conf" / "link").symlink_to("/etc/passwd")
    line = error_line(cli("build", app, "--name", "copy_demo"), ExitCode.INPUT)
    assert "conf/link is a symbolic link; an image holds only regular files" in line


def test_build_sh_runs_in_a_fixed_environment(cli: Cli, tmp_path: Path) -> None:
    outputs = []
    for index, mtime in enumerate((1_000_000_000, 1_600_000_000)):
        app = tmp_path / f"app{index}"
        app.mkdir()
        (app / "build.sh").write_text(
            "set -e\necho \"building with TZ=$TZ LC_ALL=$LC_ALL\"\n"
            "printf '#!/bin/sh\\necho %s %s %s\\n' \"$SOURCE_DATE_EPOCH\" "
            "\"$(stat -c %Y build.sh)\" \"$(date -d @$SOURCE_DATE_EPOCH +%F)\" > run\n"
            "chmod +x run\n")
        os.utime(app / "build.sh", (mtime, mtime))
        value = built(cli, app, f"script{index}")
        result = cli("measure", f"script{index}")
        assert result.out.strip() == value
        outputs.append((value, (load_image(f"script{index}").root / "run").read_text()))
    assert outputs[0] == outputs[1]
    assert "echo 315532800 315532800 1980-01-01" in outputs[0][1]


def test_an_interpreted_app_uses_host_paths(cli: Cli, tmp_path: Path) -> None:
    app = tmp_path / "py"
    app.mkdir()
    (app / "app.py").write_text("print('hi')\n")
    command = "/usr/bin/python3 /app.py"
    line = error_line(cli("build", app, "--name", "py", "--entrypoint", command),
                      ExitCode.USAGE)
    assert "entrypoint /usr/bin/python3 is neither a file of the image nor under a" in line
    value = built(cli, app, "py", "--entrypoint", command, "--host-path", "/usr/lib/python3*",
                  "--host-path", "/usr/bin/python3")
    loaded = load_image("py")
    assert loaded.host_paths == ("/usr/bin/python3", "/usr/lib/python3*")
    assert loaded.entrypoint == ("/usr/bin/python3", "/app.py")
    assert built(cli, app, "py", "--entrypoint", command, "--host-path", "/usr") != value


def test_bad_options_fail_before_building(cli: Cli, tmp_path: Path, home: Path) -> None:
    app = copy_app(tmp_path / "app")
    cases = [(["--name", "Copy Demo"], ExitCode.USAGE, "image name 'Copy Demo' is not valid"),
             (["--name", "x", "--heap", "lots"], ExitCode.USAGE, "--heap 'lots' is not a size"),
             (["--name", "x", "--stack", "1K"], ExitCode.USAGE, "stack limit 1024 bytes is "
                                                                "outside 64K to 1G"),
             (["--name", "x", "--entrypoint", "/README"], ExitCode.USAGE,
              "entrypoint /README is neither a file of the image"),
             (["--name", "x", "--host-path", "/"], ExitCode.USAGE, "whole host file system")]
    for options, code, fragment in cases:
        assert fragment in error_line(cli("build", app, *options), code)
    assert "is not a folder" in error_line(cli("build", tmp_path / "nope", "--name", "x"),
                                           ExitCode.INPUT)
    assert "no image named ghost" in error_line(cli("measure", "ghost"), ExitCode.INPUT)
    assert store_entries(home) in ([], [".lock"])


def test_images_lists_the_store(cli: Cli, tmp_path: Path) -> None:
    assert cli("images", "--json").out.strip() == "[]"
    value = built(cli, copy_app(tmp_path / "app"), "copy_demo")
    built(cli, copy_app(tmp_path / "app2"), "another", "--heap", "64M")
    table = cli("images").out.splitlines()
    assert table[0].split()[:3] == ["NAME", "MEASUREMENT", "SIZE"]
    assert table[1].startswith("another ") and table[2].startswith("copy_demo ")
    assert f"{value[:16]}…" in table[2]
    listed = json.loads(cli("images", "--json").out)
    assert [entry["name"] for entry in listed] == ["another", "copy_demo"]
    assert listed[1]["measurement"] == value and listed[0]["heap"] == 64 * 2**20


def test_image_txt_does_not_follow_a_linked_folder(cli: Cli, tmp_path: Path) -> None:
    app = copy_app(tmp_path / "app")
    (app / "etc").symlink_to("/etc")
    (app / "image.txt").write_text("copy_files\netc/passwd\n")
    line = error_line(cli("build", app, "--name", "copy_demo"), ExitCode.INPUT)
    assert "etc (on the way to etc/passwd, listed in image.txt) is not a folder" in line
