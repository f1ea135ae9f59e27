"""`dcgmi diag` text -> DiagReport, against real captures (tests/fixtures/ADDED.md, issue 17)."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portal.provisioning.dcgm import DiagReport, DiagTest, parse_dcgmi_diag
from tests import FIXTURES

ADDED = FIXTURES / "added"


def _parse(name: str) -> DiagReport:
    return parse_dcgmi_diag((ADDED / name).read_text())


def _rows(report: DiagReport) -> list[tuple[str, str, str, str]]:
    return [(t.category, t.name, t.result, t.detail) for t in report.tests]


DEPLOYMENT_3X = [
    "Denylist",
    "NVML Library",
    "CUDA Main Library",
    "Permissions and OS Blocks",
    "Persistence Mode",
    "Environment Variables",
    "Page Retirement/Row Remap",
    "Graphics Processes",
    "Inforom",
]


def _deployment_passes(names: list[str]) -> list[tuple[str, str, str, str]]:
    return [("Deployment", n, "pass", "") for n in names]


# --- all-pass captures -------------------------------------------------------------------------


def test_it_parses_an_all_pass_r2_from_dcgm_3_3_on_eight_a100s():
    report = _parse("dcgmi_diag_r2_awsome_distributed_training_efa_cheatsheet_a100.txt")
    assert report.metadata == {
        "DCGM Version": "3.3.3",
        "Driver Version Detected": "535.104.12",
        "GPU Device IDs Detected": "20b2,20b2,20b2,20b2,20b2,20b2,20b2,20b2",
    }
    assert report.dcgm_version == "3.3.3"
    assert _rows(report) == [
        *_deployment_passes(DEPLOYMENT_3X),
        ("Integration", "PCIe", "pass", "All"),
        ("Hardware", "GPU Memory", "pass", "All"),
    ]
    assert report.passed
    assert report.failures == []


def test_it_parses_an_all_pass_r1_from_dcgm_3_3_9_on_a_v100():
    report = _parse("dcgmi_diag_r1_v100_3.3.9_pass_index60815768068_EXCERPT.txt")
    assert report.dcgm_version == "3.3.9"
    assert report.metadata["GPU Device IDs Detected"] == "1db4"
    assert _rows(report) == _deployment_passes(DEPLOYMENT_3X)
    assert report.passed


def test_it_parses_the_dcgm_2_layout_with_blacklist_and_no_metadata():
    report = _parse("dcgmi_diag_r4_facebookresearch_gcm_check_dcgmi_docstring.txt")
    assert report.metadata == {}
    assert report.dcgm_version is None
    assert _rows(report) == [
        *_deployment_passes(["Blacklist", *DEPLOYMENT_3X[1:]]),
        ("Integration", "PCIe", "pass", "All"),
        ("Hardware", "GPU Memory", "pass", "All"),
        ("Hardware", "Diagnostic", "pass", "All"),
        ("Hardware", "Pulse Test", "pass", "All"),
        ("Stress", "SM Stress", "pass", "All"),
        ("Stress", "Targeted Stress", "pass", "All"),
        ("Stress", "Targeted Power", "pass", "All"),
        ("Stress", "Memory Bandwidth", "pass", "All"),
        ("Stress", "Memtest", "pass", "All"),
    ]
    assert report.passed


def test_it_parses_the_dcgm_4_layout_with_one_row_per_gpu():
    report = _parse("dcgmi_diag_r2_dcgm_issue124_4.4.2_pass_EXCERPT.txt")
    assert report.dcgm_version == "4.4.2"
    assert _rows(report) == [
        ("Deployment", "software", "pass", "GPU0: Pass"),
        ("Hardware", "memory", "pass", "GPU0: Pass"),
        ("Integration", "pcie", "pass", "GPU0: Pass"),
    ]
    assert report.passed


# --- failing captures --------------------------------------------------------------------------

CUINIT = (
    "GPU {n} Error using CUDA API cuInit Check DCGM and system logs for errors. Reset GPU. Restart "
    "DCGM. Rerun diagnostics. Unable to initialize CUDA library: 'system not yet initialized'. . "
    "Please check if a CUDA sample program can be run successfully on this host. Refer to "
    "https://github.com/nvidia/cuda-samples"
)


def test_it_reports_a_gpu_memory_failure_with_every_gpus_message_on_dcgm_3_3_8():
    report = _parse("dcgmi_diag_r3_nccl_tests_issue264_h100_gpu_memory_fail_EXCERPT.txt")
    assert report.dcgm_version == "3.3.8"
    assert [(t.category, t.name, t.result) for t in report.tests] == [
        *[("Deployment", n, "pass") for n in DEPLOYMENT_3X],
        ("Integration", "PCIe", "skip"),
        ("Hardware", "GPU Memory", "fail"),
        ("Stress", "Memory Bandwidth", "skip"),
        ("Stress", "EUD Test", "skip"),
    ]
    assert not report.passed
    [memory] = report.failures
    assert memory.name == "GPU Memory"
    assert memory.messages == tuple(CUINIT.format(n=n) for n in range(8))
    assert memory.detail == "\n".join(
        ["All", *(f"Warning: {CUINIT.format(n=n)}" for n in range(8))]
    )


def test_it_keeps_an_info_row_on_a_passing_test_without_failing_it():
    report = _parse("dcgmi_diag_r3_nccl_tests_issue264_h100_gpu_memory_fail_EXCERPT.txt")
    persistence = next(t for t in report.tests if t.name == "Persistence Mode")
    assert persistence.result == "pass"
    # DCGM's own buffer cut the message at "Enable pers"; the chunk joins keep "-i <gpuId>" intact.
    [info] = persistence.messages
    assert info.startswith(
        'Persistence mode for GPU 0 is disabled. Enable persistence mode by running "nvidia-smi -i '
        '<gpuId> -pm 1 " as root.,Persistence mode for GPU 1 is disabled.'
    )
    assert info.endswith("Persistence mode for GPU 4 is disabled. Enable pers")
    assert persistence.detail == f"Info: {info}"


def test_it_reports_a_failed_persistence_mode_check_in_an_r1_on_dcgm_3_1_8():
    report = _parse("dcgmi_diag_r1_h200_3.1.8_persistence_fail_index19926464626_EXCERPT.txt")
    assert report.dcgm_version == "3.1.8"
    assert [(t.name, t.result) for t in report.tests] == [
        (n, "fail" if n == "Persistence Mode" else "pass") for n in DEPLOYMENT_3X
    ]
    [failure] = report.failures
    [error] = failure.messages
    assert error.startswith(
        "Persistence mode for GPU 0 is currently disabled. The DCGM diagnostic requires peristence "
        'mode to be enabled. Enable persistence mode by running "nvidia-smi -i <gpuId> -pm 1 " as '
        "root., Persistence mode for GPU 1 is currently disabled."
    )
    assert error.endswith(
        "Persistence mode for GPU 5 is currently disabled. The DCGM diagnostic "
        "requires peristence mod"
    )
    assert failure.detail == f"Error: {error}"


THERMAL = (
    "GPU 0 Thermal violations totaling 13.3 seconds started at 9.7 seconds into the test for GPU 0 "
    "Verify that the cooling on this machine is functional, including external, thermal material "
    "interface, fans, and any other components."
)


def test_it_fails_a_test_whose_gpus_split_between_pass_and_fail_and_joins_the_wrapped_warning():
    report = _parse("dcgmi_diag_r2_gpu_memory_fail_thermal_ml_engineering_EXCERPT.txt")
    assert report.tests == [
        DiagTest(
            name="GPU Memory",
            result="fail",
            detail=f"GPUs: 1, 2, 3, 4, 5, 6, 7\nFail - GPU: 0\nWarning: {THERMAL}",
            messages=(THERMAL,),
        )
    ]
    assert not report.passed


def test_it_counts_an_error_row_outside_any_test_as_a_failure():
    report = _parse("dcgmi_diag_deployment_error_row_remap_ml_engineering_EXCERPT.txt")
    assert _rows(report) == [
        (
            "Deployment",
            "Error",
            "fail",
            "Error: GPU 3 has uncorrectable memory errors and row remappings are pending",
        )
    ]
    assert not report.passed


INTERNAL_ERROR = (
    "There was an internal error during the test: '{what}' Check DCGM and system logs for errors. "
    "Reset GPU. Restart DCGM. Rerun diagnostics."
)
UNPARSED = (
    "Output of child process ({pid}) couldn't be parsed: '* Line 1, Column 1   Syntax error: "
    "value, object or array expected. '"
)


def test_it_fails_a_dcgm_4_test_on_a_test_wide_warning_even_when_every_gpu_passed():
    report = _parse("dcgmi_diag_dcgm_issue253_4.2.3_pcie_fail_EXCERPT.txt")
    gpus = "\n".join(f"GPU{n}: Pass" for n in range(4))
    warnings = [
        INTERNAL_ERROR.format(what="A child process (152) exited with non-zero status 1"),
        INTERNAL_ERROR.format(what="A child process (153) exited with non-zero status 1"),
        INTERNAL_ERROR.format(what=UNPARSED.format(pid=152)),
        INTERNAL_ERROR.format(what=UNPARSED.format(pid=153)),
    ]
    assert report.dcgm_version == "4.2.3"
    assert _rows(report) == [
        ("Deployment", "software", "pass", gpus),
        ("Hardware", "memory", "pass", gpus),
        ("Integration", "pcie", "fail", "\n".join([*(f"Warning: {w}" for w in warnings), gpus])),
    ]
    assert [t.name for t in report.failures] == ["pcie"]
    assert report.failures[0].messages == tuple(warnings)


def test_it_parses_a_dcgm_4_4_pcie_failure_on_eight_b200s():
    report = _parse("dcgmi_diag_r2_dcgm_issue253_comment_4.4.1_b200_pcie_fail_EXCERPT.txt")
    assert report.metadata["GPU Device IDs Detected"] == ", ".join(["2901"] * 8)
    assert [(t.category, t.name, t.result) for t in report.tests] == [
        ("Deployment", "software", "pass"),
        ("Hardware", "memory", "pass"),
        ("Integration", "pcie", "fail"),
    ]
    [pcie] = report.failures
    assert pcie.messages == (INTERNAL_ERROR.format(what=UNPARSED.format(pid=11167)),)
    assert pcie.detail.splitlines()[1:] == [f"GPU{n}: Pass" for n in range(8)]


# --- no table ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty dcgmi diag output"),
        ("   \n\n", "empty dcgmi diag output"),
        ("bash: dcgmi: command not found\n", "no dcgmi diag result table in the output"),
        ("Error: Unable to connect to host engine\n", "no dcgmi diag result table in the output"),
        ('{\n  "DCGM GPU Diagnostic" : {}\n}\n', "JSON output (-j) is not supported"),
        (
            "+---------------------------+------------------------------------------------+\n"
            "| Diagnostic                | Result                                         |\n"
            "+===========================+================================================+\n"
            "+---------------------------+------------------------------------------------+\n",
            "result table has no test rows",
        ),
    ],
)
def test_it_raises_value_error_when_there_is_no_result_table(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_dcgmi_diag(text)


def test_it_names_what_the_output_was_instead_of_a_table():
    with pytest.raises(ValueError, match="Unable to connect to host engine"):
        parse_dcgmi_diag("Error: Unable to connect to host engine\n")


def test_it_treats_warn_as_not_a_failure():
    report = parse_dcgmi_diag(
        "| Diagnostic                | Result                                         |\n"
        "|-----  Deployment  --------+------------------------------------------------|\n"
        "| software                  | Warn                                           |\n"
        "|                           | GPU0: Warn                                     |\n"
    )
    assert [t.result for t in report.tests] == ["warn"]
    assert report.passed
    assert report.failures == []
    assert [t.name for t in report.warnings] == ["software"]


# --- properties --------------------------------------------------------------------------------

RESULT_WORDS = {"pass": "Pass", "fail": "Fail", "warn": "Warn", "skip": "Skip"}
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 /-()._"
names = (
    st.text(alphabet=_NAME_CHARS, min_size=1, max_size=25)
    .map(str.strip)
    .filter(lambda n: n != "" and not re.match(r"^(Warning|Info|Error)(:|$)", n))
)
rows = st.lists(
    st.tuples(names, st.sampled_from(sorted(RESULT_WORDS)), st.sampled_from(["", " - All"])),
    min_size=1,
    max_size=30,
)


def _render(table_rows: list[tuple[str, str, str]]) -> str:
    lines = [
        "Successfully ran diagnostic for group.",
        "+" + "-" * 27 + "+" + "-" * 48 + "+",
        f"| {'Diagnostic':<25} | {'Result':<46} |",
        "+" + "=" * 27 + "+" + "=" * 48 + "+",
        "|-----  Deployment  --------+" + "-" * 48 + "|",
    ]
    lines += [
        f"| {name:<25} | {RESULT_WORDS[result] + suffix:<46} |"
        for name, result, suffix in table_rows
    ]
    lines.append("+" + "-" * 27 + "+" + "-" * 48 + "+")
    return "\n".join(lines) + "\n"


@given(rows)
def test_it_round_trips_a_generated_table(table_rows):
    report = parse_dcgmi_diag(_render(table_rows))
    assert [(t.name, t.result) for t in report.tests] == [(n, r) for n, r, _ in table_rows]
    assert [t.detail for t in report.tests] == ["All" if s else "" for _, _, s in table_rows]
    assert report.passed == all(r != "fail" for _, r, _ in table_rows)
    assert {t.category for t in report.tests} == {"Deployment"}


table_ish = st.lists(
    st.text(alphabet="|+-= :PassFailWrnSkipGPU0123Info\t", max_size=90), max_size=20
).map("\n".join)


@settings(max_examples=300)
@given(st.one_of(st.text(), table_ish))
def test_it_raises_nothing_but_value_error_on_arbitrary_text(text):
    try:
        report = parse_dcgmi_diag(text)
    except ValueError:
        return
    assert report.tests
    assert all(t.result in {"pass", "fail", "warn", "skip"} for t in report.tests)
