"""The ConDU store on disk: one base reference, one unified delta, per task a bit mask and a
rescaler, held to a database's standard, because once a fine-tune is in, it is its user's only copy.

    layout       names of the store's files, and the rules for task names
    manifest     condu.json: typed schema, canonical checksum, consistency rules
    transaction  the writer lock, one generation's files, the atomic commit, cleanup
    faults       named points where tests make a change fail
    inputs       checkpoint arguments: paths or hub ids, and the base the checkpoints record
    plan         what a change fuses, keeps private, or refuses, checked before writing
    adapters     PEFT LoRA adapters: factor space (an adapter base) or dense (a model base)
    sources      how a pass reads a new task's delta: a checkpoint, or an adapter's B @ A
    snapshot     one generation opened for reading: checked reads, safe against writers
    passio       one generation's pass: reads, unify, the sink, statistics
    export       decouple to a file, a model folder or memory; where outputs may go
    inspect      info, and verify: the whole-file audit, per task
    migrate      a version 1 store to version 2
    front        Store, the front end
"""

from .front import DEFAULT_MODEL_SHARD_SIZE, DEFAULT_SHARD_SIZE, PASS_ELEMENTS, Store, TaskRecord
from .inspect import Health
from .manifest import ManifestError
from .transaction import StoreLockedError

__all__ = ["Store", "TaskRecord", "Health", "StoreLockedError", "ManifestError", "DEFAULT_SHARD_SIZE",
           "DEFAULT_MODEL_SHARD_SIZE", "PASS_ELEMENTS"]
