"""The job's store: every key the supervisors and the workers share, and the one record written under them.

The supervisor of node 0 hosts a `torch.distributed.TCPStore` outside the workers (see supervisor.py);
supervisors write deaths and generations into it, workers (membership.py) read them and write their own
keys. Both sides spell the keys through this module only. All values are small strings.

    generation          the newest generation (supervisors `add` to it)
    deaths, death/<n>   how many workers died, and each death (`Death`, as JSON)
    here/<g>/<rank>     the rank arrived for generation g
    pg/<g>/...          the process group of generation g (torch's own keys, under this prefix)
    progress/<rank>     the rank's "updates,unsaved" after its last finished step (what its death loses)
    kill/<step>:<rank>  an injected kill that already happened (each happens once)
    finished/<rank>     the rank's work is done: its process ending now, however, is not a failure
    done/<node>         that node's supervisor saw all its workers finish (node 0 keeps the store up until all have)
    stop                why a supervisor stopped the job (workers waiting for a generation give up)
    started/<node>      how many times that node's supervisor started (more than once: the node came back)
    elastic             some worker uses generations (`ElasticJob`): a death replaces that rank alone;
                        without it a death restarts every worker (torchrun's semantics)
    round, master/<r>   restart-all rounds (torchrun's restarts), and the MASTER_PORT of round r
    stepped/<rank>      the incarnation (process) of that rank that finished a step
    starting/<rank>     beats while the rank's replacement is alive and starting (heartbeat.py)
    startup/<rank>      seconds the rank's first process took from its start to its first rendezvous
    spare/<node>/<id>   a hot spare is imported and waiting; assign/<node>/<id>: the rank it takes (spares.py)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

STORE_ENV = "CPR_STORE"  # HOST:PORT of the job's store, in every worker's environment
GENERATION = "generation"
DEATHS = "deaths"
STOP = "stop"


# Keys of one rank, generation, node or death: `keys.HERE.format(generation=g, rank=r)` and so on.
DEATH = "death/{n}"
HERE = "here/{generation}/{rank}"
PROCESS_GROUP = "pg/{generation}"  # the prefix under which a generation's process group keeps its keys
PROGRESS = "progress/{rank}"
KILL = "kill/{step}:{rank}"
FINISHED = "finished/{rank}"
DONE = "done/{node}"
STARTED = "started/{node}"
ELASTIC = "elastic"
ROUND = "round"
MASTER = "master/{round}"
STEPPED = "stepped/{rank}"
STARTING = "starting/{rank}"
STARTUP = "startup/{rank}"
SPARE = "spare/{node}/{id}"
ASSIGN = "assign/{node}/{id}"


@dataclass(frozen=True)
class Death:
    """A worker process that ended with a non-zero code, as its supervisor saw it."""

    rank: int
    time: float  # time.time() on the supervisor's host
    returncode: int
    generation: int  # the generation its replacement joins

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Death:
        return cls(**json.loads(text))


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT as (host, port); ValueError naming the endpoint otherwise."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store endpoint {endpoint!r} is not HOST:PORT")
    return host, int(port)
