#!/bin/bash
# The shots_seed-2 run of experiments/local_prompt/README.md (run from the repository root after the
# micro CLIP of step 1 exists): fit with the 4-shot recipe and shots_seed 2, then evaluate its checkpoint.
set -ex
export OMP_NUM_THREADS=1
C=configs/local_prompt/cifar10_micro_4shot.yaml
R=runs/local_prompt/4shot_seed2
python -m robustft fit --config $C --data.init_args.shots_seed 2 --trainer.default_root_dir $R \
  --trainer.logger.init_args.save_dir $R --trainer.callbacks '[{class_path: robustft.callbacks.OODEvaluation, init_args: {every_n_epochs: 0, plots: false, report_dir: runs/local_prompt/4shot_seed2/report}}, {class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]'
python -m robustft evaluate --config $C --data.init_args.shots_seed 2 --ckpt_path $R/logs/checkpoints/last.ckpt --report_dir $R/eval
