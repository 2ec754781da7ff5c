"""Former home of the lab's build, kept so that older imports keep working: the pieces now live in
:mod:`.config` (settings), :mod:`.layout` (the PRM's input), :mod:`.sft` (policy), :mod:`.prm` (PRM),
:mod:`.metrics` (what the build measures) and :mod:`.cache` (checkpoints). Import from
:mod:`p2t.grpo.lab` instead."""
from .cache import PACKAGED_DIR, build_lab_prm, build_policy, ensure_lab, lab_paths, packaged_lab  # noqa: F401
from .cache import save_atomic as _save_atomic  # noqa: F401
from .cache import save_checkpoint as _save_model  # noqa: F401
from .cache import lab_paths as _lab_paths  # noqa: F401
from .config import LAB_VERSION, LabConfig, default_cache_dir, lab_tokenizer, policy_config  # noqa: F401
from .layout import LAYOUT, prm_example, prm_text  # noqa: F401
from .layout import pad as _pad  # noqa: F401
from .layout import token_ids as _ids  # noqa: F401
from .metrics import policy_report, prm_report, prm_step_metrics  # noqa: F401
from .prm import VERIFIER_CHECKED, VERIFIER_RIVALS, build_prm, calibrate_head, verifier_prm  # noqa: F401
from .prm import build_prm as train_prm  # noqa: F401
from .sft import lr_factor, sample, train_sft  # noqa: F401
from .task import wrong_step_kinds  # noqa: F401
