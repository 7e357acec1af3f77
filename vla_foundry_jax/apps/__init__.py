"""Application code on top of the library: what ``launch/`` scripts call, one function per command.

* :mod:`~vla_foundry_jax.apps.text_generation`: text continuations of an LLM run (``launch.generate``);
* :mod:`~vla_foundry_jax.apps.captioning`: captioning images with a VLM run and scoring captions
  (``launch.caption``, ``launch.eval_caption``);
* :mod:`~vla_foundry_jax.apps.stable_diffusion`: stable-diffusion runs: loading, prompts, PNG grids
  (``launch.sample_sd``); :mod:`~vla_foundry_jax.apps.sd_eval`: colour accuracy on the shapes task
  (``launch.eval_sd``);
* :mod:`~vla_foundry_jax.apps.policy_eval`: reach-policy rollouts, the random baseline, action plots
  (``launch.eval_policy``);
* :mod:`~vla_foundry_jax.apps.hf_conversion`: Hugging Face checkpoint -> run and ``transformer_hf`` run -> Hugging
  Face checkpoint (``launch.convert_hf``, ``launch.export_hf``);
* :mod:`~vla_foundry_jax.apps.gin_train`: a training run from gin files (``launch.train``);
* :mod:`~vla_foundry_jax.apps.lerobot_convert`: LeRobot datasets -> the original's robotics shards + stats.json
  (``launch.convert_lerobot``);
* :mod:`~vla_foundry_jax.apps.policy_offline_eval`: action error of a policy on held-out robotics data
  (``launch.eval_policy_offline``).

Apps import the library (models, training, sampling, data, testbeds); nothing in the library imports apps.
"""
