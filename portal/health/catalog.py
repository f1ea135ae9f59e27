"""NVIDIA's XID catalog and the default health policy for each XID.

Sources:

* NVIDIA, "Analyzing Xid Errors with the Xid Catalog" (Ampere and newer, r5xx drivers),
  https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html: its "Description" column
  gives ``title`` and its "Resolution Bucket (Immediate Action)" column gives ``nvidia_action``,
  word for word (RESTART_APP, RESET_GPU, RESTART_BM = restart the bare-metal node, IGNORE,
  WORKFLOW_*, ...). Read through a stored copy of the page, December 2026.
* NVIDIA/NVSentinel ``distros/kubernetes/nvsentinel/charts/gpu-health-monitor/xiderrorsmapping.csv``
  @ 6f8b0fcf8e502bdda78fabf96facef729a9285b (code, mnemonic, action, FATAL/NONFATAL): the same
  actions, used as a cross-check. It differs from the page only where the page has moved on (it
  maps 160 to RESTART_BM where the page now says IGNORE); no code below is affected.
* 56, 57 and 61 are "Unused" on Ampere and newer in that catalog (action CONTACT_SUPPORT). Their
  titles are NVIDIA's from the pre-Ampere "Xid Errors" page (r555, Sep 2024) as quoted in
  leptonai/gpud ``pkg/nvidia-query/xid/xid.go`` @ 726e98fdda5b91f8cd5416945f2e8441a93ee3d4.

Default actions (the product brief): notify the tenant for application faults; cordon the GPU
where NVIDIA's action is a GPU reset, an ECC/NVLink workflow or a hardware check; cordon the node
where the catalog needs the node restarted (79; 110, whose text asks for a cold reset of the
system); record the rest. Two deliberate departures from NVIDIA's IGNORE: 63 (a pending row remap
only takes effect after a GPU reset) and 92 (a high single-bit ECC rate is the early sign of a
failing GPU) cordon the GPU. Operators override any of these per XID
(``portal.health.models.HealthRule``).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import models


class Action(models.TextChoices):
    RECORD = "record", "Record only"
    NOTIFY_TENANT = "notify_tenant", "Notify the tenant"
    CORDON_GPU = "cordon_gpu", "Cordon the GPU"
    CORDON_NODE = "cordon_node", "Cordon the node"


@dataclass(frozen=True)
class XidEntry:
    code: int
    title: str  # NVIDIA's short description
    nvidia_action: str  # NVIDIA's immediate action as the catalog words it (e.g. "RESET_GPU")
    action: str  # our default Action
    note: str  # what an operator should do, one sentence
    mnemonic: str = ""  # the driver's name for the XID (nverror.h), as the catalog lists it


_R, _T, _G, _N = Action.RECORD, Action.NOTIFY_TENANT, Action.CORDON_GPU, Action.CORDON_NODE

_APP_FAULT = "Usually a fault in the application (bad address, illegal instruction): "
_NVLINK5 = (
    "NVLink 5 error: follow NVIDIA's per-subcode workflow, which for fatal subcodes means draining "
    "and resetting the GPU."
)

_ENTRIES = [
    XidEntry(
        8,
        "GPU stopped processing",
        "RESTART_APP",
        _T,
        "The GPU stopped processing a channel: restart the application; report it if it repeats "
        "with no application change.",
        "ROBUST_CHANNEL_FIFO_ERROR_IDLE_TIMEOUT",
    ),
    XidEntry(
        13,
        "Graphics Engine Exception",
        "RESTART_APP",
        _T,
        _APP_FAULT + "restart the job and debug it with compute-sanitizer; the GPU is healthy.",
        "ROBUST_CHANNEL_GR_EXCEPTION / ROBUST_CHANNEL_GR_ERROR_SW_NOTIFY",
    ),
    XidEntry(
        31,
        "GPU memory page fault",
        "RESTART_APP",
        _T,
        _APP_FAULT
        + "an out-of-bounds access; restart the job and debug it with compute-sanitizer.",
        "ROBUST_CHANNEL_FIFO_ERROR_MMU_ERR_FLT",
    ),
    XidEntry(
        32,
        "Invalid or corrupted push buffer stream",
        "RESTART_APP",
        _R,
        "Reported by the DMA controller and mostly caused by PCIe link quality, not the "
        "application: watch the node's PCIe link if it repeats.",
        "ROBUST_CHANNEL_PBDMA_ERROR",
    ),
    XidEntry(
        38,
        "Driver firmware error",
        "IGNORE",
        _R,
        "A driver firmware error NVIDIA says to ignore; report it if it keeps coming back.",
        "ROBUST_CHANNEL_FECS_ERR_WATCHDOG_TIMEOUT",
    ),
    XidEntry(
        43,
        "GPU stopped processing",
        "IGNORE",
        _T,
        "The application hit a software-induced fault and was stopped; the GPU remains healthy.",
        "ROBUST_CHANNEL_RESETCHANNEL_VERIF_ERROR",
    ),
    XidEntry(
        45,
        "Preemptive cleanup, due to previous errors \u2013 Most likely to see when running "
        "multiple cuda applications and hitting a DBE",
        "WORKFLOW_XID_45",
        _R,
        "The driver tore down an application (Ctrl-C, kill, GPU reset, or an earlier XID): "
        "look at the XID logged before it.",
        "ROBUST_CHANNEL_PREEMPTIVE_REMOVAL",
    ),
    XidEntry(
        46,
        "GPU stopped processing",
        "RESET_GPU",
        _G,
        "The GPU timed out: drain it and reset it before it takes work again.",
        "ROBUST_CHANNEL_GPU_TIMEOUT_ERROR",
    ),
    XidEntry(
        48,
        "Double Bit ECC Error",
        "WORKFLOW_XID_48",
        _G,
        "Uncorrectable memory error: drain the GPU and reset it (or reboot the node), and RMA it "
        "if NVIDIA's SRAM threshold is exceeded.",
        "ROBUST_CHANNEL_GPU_ECC_DBE",
    ),
    XidEntry(
        54,
        "Auxiliary power is not connected to the GPU board",
        "CHECK_MECHANICALS",
        _G,
        "The board's auxiliary power is missing: check the power cabling before the GPU takes "
        "work.",
        "SILENT_RUNNING_PWR_REDUCED_CLOCKING",
    ),
    XidEntry(
        56,
        "Display Engine error",
        "CONTACT_SUPPORT",
        _R,
        "Unused on Ampere and newer; on older GPUs a display engine error, so report it to NVIDIA.",
        "DISPLAY_CHANNEL_EXCEPTION",
    ),
    XidEntry(
        57,
        "Error programming video memory interface",
        "CONTACT_SUPPORT",
        _G,
        "Unused on Ampere and newer; on older GPUs a video memory interface fault, so take the GPU "
        "out and report it.",
        "FB_LINK_TRAINING_FAILURE_ERROR",
    ),
    XidEntry(
        61,
        "Internal micro-controller breakpoint/warning (newer drivers)",
        "CONTACT_SUPPORT",
        _G,
        "An internal micro-controller stopped: reset the GPU and report it to NVIDIA if it "
        "repeats.",
        "PMU_BREAKPOINT",
    ),
    XidEntry(
        62,
        "Internal micro-controller halt (newer drivers)",
        "RESET_GPU",
        _G,
        "An internal micro-controller halted: drain the GPU and reset it.",
        "PMU_HALT_ERROR",
    ),
    XidEntry(
        63,
        "GPU memory remapping event",
        "IGNORE",
        _G,
        "A memory row was marked for remapping, which takes effect only after a GPU reset: drain "
        "and reset the GPU.",
        "INFOROM_DRAM_RETIREMENT_EVENT",
    ),
    XidEntry(
        64,
        "GPU memory remapping failure",
        "RESET_GPU",
        _G,
        "Recording a memory row remap failed: drain and reset the GPU, and RMA it if it repeats.",
        "INFOROM_DRAM_RETIREMENT_FAILURE",
    ),
    XidEntry(
        68,
        "NVDEC0 Exception",
        "RESTART_APP",
        _T,
        "The video decoder engine raised an exception in the application: restart the job.",
        "ROBUST_CHANNEL_NVDEC0_ERROR",
    ),
    XidEntry(
        69,
        "Graphics Engine class error",
        "RESTART_APP",
        _T,
        _APP_FAULT + "restart the job and check the application and its CUDA version.",
        "ROBUST_CHANNEL_GR_CLASS_ERROR",
    ),
    XidEntry(
        74,
        "NVLINK Error",
        "WORKFLOW_NVLINK_ERR",
        _G,
        "An NVLink connection failed: reset the GPU or reboot the node, check the GPU at the other "
        "end of the link, and call the hardware vendor if it persists.",
        "NVLINK_ERROR",
    ),
    XidEntry(
        79,
        "GPU has fallen off the bus",
        "RESTART_BM",
        _N,
        "The GPU is unreachable over PCIe: take the node out, check its PCIe and power, and "
        "reboot it.",
        "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS",
    ),
    XidEntry(
        92,
        "High single-bit ECC error rate",
        "IGNORE",
        _G,
        "Corrected errors at a high rate, an early sign of failing memory: take the GPU out and "
        "plan its replacement.",
        "EXCESSIVE_SBE_INTERRUPTS",
    ),
    XidEntry(
        94,
        "Contained memory error",
        "RESTART_APP",
        _G,
        "A memory error killed one application and spared the rest: restart that job, and drain "
        "and reset the GPU when convenient.",
        "ROBUST_CHANNEL_CONTAINED_ERROR",
    ),
    XidEntry(
        95,
        "Uncontained memory error",
        "RESET_GPU",
        _G,
        "A memory error affected every application on the GPU: drain it and reset it before "
        "anything restarts.",
        "ROBUST_CHANNEL_UNCONTAINED_ERROR",
    ),
    XidEntry(
        109,
        "Context Switch Timeout Error",
        "RESET_GPU",
        _G,
        "A context switch timed out: drain the GPU and reset it.",
        "ROBUST_CHANNEL_CTXSW_TIMEOUT_ERROR",
    ),
    XidEntry(
        110,
        "Security Fault Error",
        "RESET_GPU",
        _N,
        "A security fault, uncommon without a hardware failure: revert recent hardware changes "
        "and cold-reset the node, then call the vendor if it persists.",
        "SEC_FAULT_ERROR",
    ),
    XidEntry(
        119,
        "GSP RPC Timeout",
        "RESET_GPU",
        _G,
        "The GPU's GSP firmware did not answer: reset the GPU (power-cycle the node if it "
        "persists) and follow NVIDIA's GPU debug guidelines if it recurs.",
        "GSP_RPC_TIMEOUT",
    ),
    XidEntry(
        120,
        "GSP Error",
        "RESET_GPU",
        _G,
        "Code on the GPU's GSP core failed: reset the GPU (power-cycle the node if it persists).",
        "GSP_ERROR",
    ),
    XidEntry(
        121,
        "C2C Error",
        "IGNORE",
        _R,
        "Corrected errors on the C2C link to the Grace CPU, with no operational impact: reset the "
        "GPU at the next service window.",
        "C2C_ERROR",
    ),
    XidEntry(
        136,
        "Link Training Failed",
        "RESET_GPU",
        _G,
        "Link training failed: drain and reset the GPU, and investigate the link's signal "
        "integrity.",
        "ALI_TRAINING_FAIL",
    ),
    XidEntry(
        140,
        "ECC Unrecovered Error",
        "RESET_GPU",
        _G,
        "Uncorrectable memory errors arrived too fast to be offlined or remapped: reset the GPU "
        "and call the vendor if it persists.",
        "UNRECOVERABLE_ECC_ERROR_ESCAPE",
    ),
    XidEntry(
        143,
        "GPU Initialization Error",
        "RESET_GPU",
        _G,
        "The GPU failed to initialise: reset it before it takes work.",
        "GPU_INIT_ERROR",
    ),
    XidEntry(144, "NVLINK: SAW Error", "WORKFLOW_NVLINK5_ERR", _G, _NVLINK5, "NVLINK_SAW_ERROR"),
    XidEntry(145, "NVLINK: RLW Error", "WORKFLOW_NVLINK5_ERR", _G, _NVLINK5, "NVLINK_RLW_ERROR"),
    XidEntry(146, "NVLINK: TLW Error", "WORKFLOW_NVLINK5_ERR", _G, _NVLINK5, "NVLINK_TLW_ERROR"),
    XidEntry(147, "NVLINK: TREX Error", "WORKFLOW_NVLINK5_ERR", _G, _NVLINK5, "NVLINK_TREX_ERROR"),
    XidEntry(
        148,
        "NVLINK: NVLPW_CTRL Error",
        "WORKFLOW_NVLINK5_ERR",
        _G,
        _NVLINK5,
        "NVLINK_NVLPW_CTRL_ERROR",
    ),
    XidEntry(
        149, "NVLINK: NETIR Error", "WORKFLOW_NVLINK5_ERR", _G, _NVLINK5, "NVLINK_NETIR_ERROR"
    ),
    XidEntry(150, "NVLINK: MSE Error", "WORKFLOW_NVLINK5_ERR", _G, _NVLINK5, "NVLINK_MSE_ERROR"),
    XidEntry(
        154,
        "GPU Recovery Action Changed",
        "XID_154",
        _R,
        "Summarises the recovery another XID needs (GPU reset or node reboot): act on the action "
        "it names.",
        "GPU_RECOVERY_ACTION_CHANGED",
    ),
    XidEntry(
        155,
        "NVLINK: SW Defined Error",
        "RESET_GPU",
        _G,
        "A link was taken down on purpose (or put to sleep): reset the GPU before it takes work.",
        "NVLINK_SW_DEFINED_ERROR",
    ),
    XidEntry(
        156,
        "Resource Retirement Event",
        "RESET_GPU",
        _G,
        "A GPU resource was retired: drain and reset the GPU so the retirement takes effect.",
        "RESOURCE_RETIREMENT_EVENT",
    ),
    XidEntry(
        157,
        "Resource Retirement Failure",
        "IGNORE",
        _R,
        "No spare resources are left to repair with; work can run but the same XID may return.",
        "RESOURCE_RETIREMENT_FAILURE",
    ),
    XidEntry(
        158,
        "GPU Fatal Timeout",
        "RESET_GPU",
        _G,
        "A fatal timeout on the GPU: drain it and reset it.",
        "GPU_FATAL_TIMEOUT",
    ),
]

CATALOG: dict[int, XidEntry] = {entry.code: entry for entry in _ENTRIES}
