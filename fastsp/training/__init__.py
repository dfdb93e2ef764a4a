"""A training run in five modules, each one job, in the order a run uses them:

- plan: every refusal, the configs completed from the data, the CUDA-graph decision, the
  resume and init sources, as one frozen `Plan` (writes nothing);
- resume: what a resume, an --init or a perceptual checkpoint may differ in (the rule of each
  TrainConfig field is declared on the field, in fastsp.config);
- assembly: the one `assemble(plan, info)` the trainer, the dry run and the step benchmark call;
- outputs: the run folder (config.json, backends.json, metrics, sample grids, checkpoints), the
  first lines and the progress;
- loop: `train`, `build_run` and `run_loop`, read top to bottom.
"""
