"""A training run in its own process, for kill/resume tests: prints one line per finished step.

    python tests/workers/train_worker.py OUTPUT_DIR DATA NUM_STEPS [--config.key=value ...]

The device count comes from XLA_FLAGS in the environment. At the end it prints the final
parameters' checksum line and writes them to OUTPUT_DIR/final_params.npz.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    import jax
    import numpy as np

    from flux_jax import FluxTrainer
    from flux_jax.demo import demo_config

    output_dir, data, num_steps, *overrides = sys.argv[1:]
    config = demo_config()
    config.output_dir = output_dir
    config.num_steps = int(num_steps)
    config.checkpoint.save_steps = 3
    config.checkpoint.max_to_keep = 10
    config.logging.progress_bar = False
    config.logging.every_steps = 1
    config.data.max_length = 64
    config.data.max_prompt_length = 32
    config.apply_overrides([o.removeprefix("--config.") for o in overrides])
    trainer = FluxTrainer(config)

    @trainer.add_step_callback
    def announce(result):
        print(f"STEP {result.step} {result.metrics['loss']:.9f}", flush=True)

    result = trainer.fit(prompts=data)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(trainer.params))[0]
    }
    np.savez(os.path.join(output_dir, "final_params.npz"), **flat)
    print(f"DONE {result.num_steps} preempted={result.preempted} resumed={result.resumed_from}")


if __name__ == "__main__":
    main()
