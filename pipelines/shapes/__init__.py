"""The project's own small reference models: procedural shapes data, pipelines, classifier, training."""
