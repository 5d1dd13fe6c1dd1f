"""A TorchRec DLRM training loop that survives the death of a rank: only that rank is restarted and
reloads its own embedding rows; the others keep their memory and go on.

    .venv/bin/python -m cpr.run --nproc 3 examples/train_dlrm.py --steps 200 --kill-at 100:1

Plain TorchRec otherwise: a DLRM on Criteo-shaped batches (13 dense features, 26 sparse ones; TorchRec's
`RandomRecDataset`), sharded by `DistributedModelParallel` and trained with fbgemm's fused row-wise Adagrad.
The lines marked `# CPR` are what CPR adds. Each rank's batch is a function of the step, so a replacement
that takes over at step S reads exactly the batches the dead rank would have read.
"""
import argparse

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, INT_FEATURE_COUNT
from torchrec.datasets.random import RandomRecDataset
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from cpr import CPRCheckpointer  # CPR
from cpr.elastic import ElasticJob  # CPR

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=256)
parser.add_argument("--rows", type=int, default=10_000, help="rows per embedding table")
parser.add_argument("--checkpoints", default="runs/example/checkpoints")
parser.add_argument("--kill-at", default=None, metavar="STEP:RANK", help="demo: kill that rank as it starts that step")
args = parser.parse_args()


def build() -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """The model and optimizer, sharded over the current process group (called again after a failure)."""
    tables = [EmbeddingBagConfig(name=f"t_{name}", embedding_dim=8, num_embeddings=args.rows, feature_names=[name])
              for name in DEFAULT_CAT_NAMES]
    dlrm = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
                dense_in_features=INT_FEATURE_COUNT, dense_arch_layer_sizes=[32, 8], over_arch_layer_sizes=[32, 1])
    sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                          "learning_rate": 0.05})
    model = DistributedModelParallel(DLRMTrain(dlrm), device=torch.device("cpu"), sharders=[sharder])
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.01))
    return model, CombinedOptimizer([model.fused_optimizer, dense])


def batch_at(step: int, rank: int):
    data = RandomRecDataset(keys=DEFAULT_CAT_NAMES, batch_size=args.batch_size, hash_size=args.rows, ids_per_feature=2,
                            num_dense=INT_FEATURE_COUNT, manual_seed=step * 1000 + rank, num_batches=1)
    return next(iter(data))


kills = [tuple(int(x) for x in args.kill_at.split(":"))] if args.kill_at else []
job = ElasticJob(build, lambda model, optimizer, joining: CPRCheckpointer(  # CPR
    model, optimizer, args.checkpoints, policy="partial", total_steps=args.steps, overwrite=True, joining=joining),
    kills=kills)  # CPR
rank = job.ckpt.coordinator.rank
while job.step < args.steps:  # CPR: the step survives recoveries
    batch = batch_at(job.step, rank)
    with job.training_step():  # CPR: a peer's death drops this step and heals the job
        loss, _ = job.model(batch)
        job.optimizer.zero_grad()
        loss.backward()
        job.optimizer.step()
        job.ckpt.step()  # CPR: saves as the policy plans
    if rank == 0 and job.step % 50 == 0:
        print(f"step {job.step} loss {float(loss):.4f}", flush=True)
report = job.report()  # CPR
if rank == 0:
    print(f"done: {job.step} steps, {len(report['recoveries'])} recoveries "
          + ", ".join(f"(rank {r['rank']} at step {r['step']}: {r['kind']}, replacement read {r['bytes_read']:,} bytes, "
                      f"survivors {r['survivor_bytes_read']:,})" for r in report["recoveries"]))
job.close()  # CPR: commits the last save, leaves the process group
