"""The program around the components: build, train/evaluate loop, checkpoints, parameter accounting."""
