"""The embedded demo: the private MNIST split and the synthetic web pool (world.py), the demo teacher
(teacher.py), and the demo's config section (config.py)."""
