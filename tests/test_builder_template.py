"""The session template ``tdapp build -o`` writes: the seed's form, accepted by tdapp.policy."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult

import tdapp.cli
from tdapp.builder import Image, load_image, session_template
from tdapp.cli.build import build, image, images, measure
from tdapp.policy import Session, fill_template, parse_session, template_variables

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "copy_dapp"
Cli = Callable[..., CliResult]
VALUES = {"SESSION": "my-session", "INPUT_FSPF_KEY": "1" * 64, "INPUT_FSPF_TAG": "2" * 32,
          "OUTPUT_FSPF_KEY": "3" * 64, "OUTPUT_FSPF_TAG": "4" * 32,
          "LAS_PLATFORM": "5" * 64}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TDAPP_LAS", "127.0.0.1:1")  # no LAS: the template names $LAS_PLATFORM
    for command in (build, measure, images, image):
        monkeypatch.setitem(tdapp.cli.cli.commands, str(command.name), command)
    return tmp_path / "home"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE, tmp_path / "copy_dapp",
                                ignore=shutil.ignore_patterns("copy_files")))


def parsed(path: Path) -> Session:
    return parse_session(fill_template(path.read_text(), VALUES), source=str(path))


def test_the_walkthrough_template_parses_and_names_the_measurement(
        cli: Cli, app: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("build", app, "--name", "copy_demo", "-o", "copy_dapp.yml")
    assert result.code == 0, result.err
    value = result.out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", value)
    text = (tmp_path / "copy_dapp.yml").read_text()
    assert template_variables(text) == set(VALUES)
    session = parsed(tmp_path / "copy_dapp.yml")
    assert session.name == "my-session" and session.digest == "create"
    service = session.service("application")
    assert service is not None
    assert service.mrenclaves == (value,)
    assert service.image_name == "copy_demo"
    assert service.argv() == ["/copy_files"] and service.pwd == "/"
    declared = session.image("copy_demo")
    assert declared is not None and declared.mrenclaves == (value,)
    assert {(mount.name, mount.path) for mount in declared.volumes} == {
        ("encrypted-input-files", "/encryptedInputs"),
        ("encrypted-output-files", "/encryptedOutputs")}
    volume = session.volume("encrypted-output-files")
    assert volume is not None and volume.fspf_tag == "4" * 32
    assert f"     image_name: copy_demo\n     mrenclaves: [{value}]\n" in text  # the seed's form
    # The mode is fixed in the template: sim, from the LAS platform the client fills in.
    assert session.security.attestation.mode == "sim"
    assert session.security.attestation.platforms == ("5" * 64,)
    assert "platforms: [$LAS_PLATFORM]" in text


def test_no_template_is_written_without_o(cli: Cli, app: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli("build", app, "--name", "copy_demo").code == 0
    assert not list(tmp_path.glob("*.yml"))


def test_hardware_mode_asks_for_hardware_attestation(cli: Cli, app: Path,
                                                     tmp_path: Path) -> None:
    target = tmp_path / "hw.yml"
    assert cli("build", app, "--name", "copy_demo", "--mode", "hardware", "-o", target).code == 0
    assert parsed(target).security.attestation.mode == "hardware"


def test_arguments_survive_the_session_command(cli: Cli, app: Path, tmp_path: Path) -> None:
    target = tmp_path / "args.yml"
    entrypoint = "/copy_files '/encrypted Inputs' \"it's: #here\" /out"
    result = cli("build", app, "--name", "copy_demo", "--entrypoint", entrypoint, "-o", target)
    assert result.code == 0, result.err
    service = parsed(target).service("application")
    assert service is not None
    assert service.argv() == ["/copy_files", "/encrypted Inputs", "it's: #here", "/out"]
    assert tuple(service.argv()) == load_image("copy_demo").entrypoint


def test_template_replaces_an_old_file_in_one_step(cli: Cli, app: Path,
                                                   tmp_path: Path) -> None:
    target = tmp_path / "copy_dapp.yml"
    target.write_text("old\n")
    assert cli("build", app, "--name", "copy_demo", "-o", target).code == 0
    assert target.read_text() == session_template(load_image("copy_demo"))
    assert sorted(os.listdir(tmp_path)) == ["copy_dapp", "copy_dapp.yml", "home"]


@pytest.mark.parametrize("name", ["123", "1e3", "0x1f", "1_000", "true", "null", "no", "a.b-c"])
@pytest.mark.parametrize("measured", ["1" * 64, "1" * 30 + "e" + "2" * 33, "ab" * 32])
def test_names_and_measurements_yaml_could_misread(tmp_path: Path, name: str,
                                                   measured: str) -> None:
    made = Image(name, tmp_path, ("/p",), 2**20, 2**16, "sim", (), (), measured, "t")
    path = tmp_path / "t.yml"
    path.write_text(session_template(made))
    session = parsed(path)
    service = session.service("application")
    assert service is not None and service.image_name == name
    assert service.mrenclaves == (measured,)


def test_a_template_into_a_missing_folder_fails_before_building(cli: Cli, app: Path,
                                                                tmp_path: Path) -> None:
    result = cli("build", app, "--name", "copy_demo", "-o", tmp_path / "no" / "t.yml")
    assert result.code == 3 and result.out == ""
    assert result.err.splitlines() == [
        f"tdapp: error: cannot write {tmp_path / 'no' / 't.yml'}: its folder does not exist"]
    assert not (tmp_path / "home" / "images" / "copy_demo").exists()


VM = {"mrtd": "a1" * 48, "rtmr0": "b2" * 48, "rtmr1": "c3" * 48, "rtmr2": "d4" * 48}


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_a_confidential_vm_template_pins_the_vm_and_the_workload(
        cli: Cli, app: Path, tmp_path: Path, tee: str) -> None:
    from tdapp.policy.enforced import parse_enforceable_session

    target = tmp_path / f"{tee}.yml"
    built = cli("build", app, "--name", "copy_demo", "--tee", tee, "-o", target)
    assert built.code == 0, built.err
    measured = built.out.strip()
    text = target.read_text()
    # The VM half is left to fill in; the workload half is the image's measurement.
    wanted = {"tdx": {"TDX_MRTD", "TDX_RTMR0", "TDX_RTMR1", "TDX_RTMR2"},
              "snp": {"SNP_MEASUREMENT"}}[tee]
    assert wanted <= set(template_variables(text))
    values = {**VALUES, **dict.fromkeys(wanted, "e5" * 48)}
    session = parse_enforceable_session(fill_template(text, values), source=str(target))
    (variant,) = session.services[0].attestation
    assert variant.mrenclave == (measured,) and not variant.unsafe_any_workload
    assert (variant.tdx if tee == "tdx" else variant.snp) is not None
    assert session.security.attestation.mode == "hardware"


def test_vm_measurements_from_a_file_are_written_in(cli: Cli, app: Path, tmp_path: Path) -> None:
    vm = tmp_path / "vm.json"
    vm.write_text(json.dumps(VM))
    target = tmp_path / "tdx.yml"
    assert cli("build", app, "--name", "copy_demo", "--tee", "tdx", "--vm-measurements", vm,
               "-o", target).code == 0
    (variant,) = parsed(target).services[0].attestation
    assert variant.tdx is not None and variant.tdx.mrtd == (VM["mrtd"],)
    assert variant.tdx.rtmr2 == VM["rtmr2"]


@pytest.mark.parametrize(("args", "fragment"), [
    (("--tee", "sim", "--mode", "hardware"), "do not go together"),
    (("--tee", "tdx", "--mode", "sim"), "do not go together"),
    (("--vm-measurements", "VM"), "needs --tee tdx or --tee snp"),
])
def test_inconsistent_tee_options_are_refused(cli: Cli, app: Path, tmp_path: Path,
                                              args: tuple[str, ...], fragment: str) -> None:
    (tmp_path / "VM").write_text("{}")
    args = tuple(str(tmp_path / "VM") if arg == "VM" else arg for arg in args)
    result = cli("build", app, "--name", "copy_demo", *args, "-o", tmp_path / "t.yml")
    assert result.code == 2 and fragment in result.err and "Traceback" not in result.err


def test_bad_vm_measurements_are_one_line(cli: Cli, app: Path, tmp_path: Path) -> None:
    vm = tmp_path / "vm.json"
    vm.write_text(json.dumps({"mrtd": "short"}))
    result = cli("build", app, "--name", "copy_demo", "--tee", "tdx", "--vm-measurements", vm,
                 "-o", tmp_path / "t.yml")
    assert result.code == 3 and "mrtd must be 96 hex" in result.err
