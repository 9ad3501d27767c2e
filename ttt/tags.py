"""The MLflow tags ttt writes and reads: each name defined once, here.

Runs are found again by their tags (a resumed trial by `TRIAL_ID`, a single run by
`RUN_DIR`, an evaluation by `EVAL_OF` and its key), and the analysis loaders select them
by `ROLE`. A new tag is a constant here, written where the run's other tags are written.
"""

PREFIX = "ttt."

# What a run is, and where it belongs
ROLE = "ttt.role"  # run | trial | sweep | eval | eval_noinner | telemetry | niah | bench
SWEEP = "ttt.sweep"
STAGE = "ttt.stage"
TRIAL_ID = "ttt.trial_id"  # Ray Tune's trial id
TRIAL_NAME = "ttt.trial_name"  # Tune's readable trial name
RUN_DIR = "ttt.run_dir"  # the run directory a single run (or trial) wrote
EVAL_OF = "ttt.eval_of"  # the run directory an evaluation read
SEQ_LEN = "ttt.seq_len"  # an evaluation's context length (part of its key)
NIAH_TASK = "ttt.niah_task"  # a NIAH evaluation's task (part of its key)

# How it ended
OUTCOME = "ttt.outcome"  # finished | diverged | error | early_stopped | interrupted
MESSAGE = "ttt.message"
RETRIES = "ttt.retries"
RESUMED_FROM = "ttt.resumed_from"
EXTENDED_TO_STEPS = "ttt.extended_to_steps"  # params cannot change: a longer run says so

# Where it ran and what with
CHECKPOINT = "ttt.checkpoint"
CHECKPOINT_DIR = "ttt.checkpoint_dir"
NODE_ID = "ttt.node_id"
NODE_IDS = "ttt.node_ids"
NODE_IP = "ttt.node_ip"
PROCESSES = "ttt.processes"
VERSION = "ttt.version"
GIT_COMMIT = "ttt.git_commit"
GIT_DIRTY = "ttt.git_dirty"
FLOPS_PER_TOKEN = "ttt.flops_per_token"

# A sweep's parent run
SPEC = "ttt.spec"
SPEC_DIGEST = "ttt.spec_digest"
OVERRIDES = "ttt.overrides"
STORAGE_PATH = "ttt.storage_path"
SWEPT = "ttt.swept"
BEST_RUN = "ttt.best_run"
BEST_RUN_ID = "ttt.best_run_id"
TRIALS_VIEW = "ttt.trials_view"  # the UI link to the trials' curves (ttt.tracking.views)
FLOORS = "ttt.floors"  # a sweep's datasets' n-gram floors: JSON {source: Floors as JSON}

# The parts of an evaluation's key that name it in its run name (not the run dir's path)
NAMING = (SEQ_LEN, NIAH_TASK)
