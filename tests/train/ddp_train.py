"""Worker script for test_distributed.py: `torchrun ... ddp_train.py '<TrainConfig as JSON>'`.

Kept as a plain script so the test does not depend on the CLI; every rank calls train().
"""

import json
import sys

from fastserve.train import TrainConfig, train

if __name__ == "__main__":
    result = train(TrainConfig.from_dict(json.loads(sys.argv[1])), progress=False)
    print(json.dumps({"steps": result.steps, "loss": result.last_train_loss}))
