"""The acceptance test's memory check reads `nvidia-smi --query-gpu` by column name: real captures, the faults it
must see, and any text raising nothing but ValueError."""

import contextlib
import csv
import io

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from portal.provisioning.parsing import (
    MEMORY_HEALTH_FIELDS,
    MemoryHealth,
    parse_memory_health_csv,
    parse_query_gpu_csv,
)
from tests import FIXTURES

CAPTURES = sorted(p.name for p in FIXTURES.glob("nvidia_smi_query_gpu_csv_*.txt"))


@pytest.mark.parametrize("name", CAPTURES)
def test_it_reads_every_real_capture_as_clean(name):
    [gpu] = parse_memory_health_csv((FIXTURES / name).read_text())
    assert gpu.index == 0 and gpu.uncorrected_volatile == 0 and gpu.problems == []
    # MIG mode hides the row remapper: nvidia-smi prints [N/A], which is "not reported", not "no".
    assert gpu.remap_pending is (None if "mig" in name else False)


def _with(name: str, **columns: str) -> str:
    """The capture with some of its columns set to other values nvidia-smi prints."""
    rows = list(csv.reader(io.StringIO((FIXTURES / name).read_text()), skipinitialspace=True))
    header = [h.split(" [")[0] for h in rows[0]]
    for column, value in columns.items():
        rows[1][header.index(column)] = value
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def test_it_names_each_fault():
    text = _with("nvidia_smi_query_gpu_csv_h100_590_load.txt", **{
        "ecc.errors.uncorrected.volatile.total": "2", "remapped_rows.pending": "Yes",
        "remapped_rows.failure": "Yes"})
    [gpu] = parse_memory_health_csv(text)
    assert gpu.problems == ["2 uncorrected ECC error(s) since the driver loaded",
                            "a row remap is pending (needs a GPU reset)",
                            "row remapping failed: the GPU is out of spare rows"]
    assert MemoryHealth(index=1, uncorrected_volatile=None, retired_pending=True, remap_pending=None,
                        remap_failure=None).problems == ["a page retirement is pending (needs a GPU reset)"]


def test_it_refuses_output_that_is_not_the_query():
    with pytest.raises(ValueError, match="printed nothing"):
        parse_memory_health_csv("  \n")
    with pytest.raises(ValueError, match=r"no ecc\.errors\.uncorrected\.volatile\.total"):
        parse_memory_health_csv("index, name\n0, NVIDIA H100 80GB HBM3\n")
    header = ", ".join(MEMORY_HEALTH_FIELDS)
    with pytest.raises(ValueError, match="line 2 has 2 fields"):
        parse_memory_health_csv(f"{header}\n0, 0\n")


@pytest.mark.parametrize("parse", [parse_memory_health_csv, parse_query_gpu_csv])
@given(text=st.text())
@example(text="a\rb\n")  # a bare CR inside a line once escaped as csv.Error
def test_any_text_raises_nothing_but_value_error(parse, text):
    with contextlib.suppress(ValueError):
        parse(text)


def test_crlf_output_reads_as_the_capture():
    text = (FIXTURES / CAPTURES[0]).read_text()
    assert parse_memory_health_csv(text.replace("\n", "\r\n")) == parse_memory_health_csv(text)
    assert parse_query_gpu_csv(text.replace("\n", "\r\n")) == parse_query_gpu_csv(text)
