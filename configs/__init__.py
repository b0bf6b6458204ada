"""The default YAML configs, shipped inside the wheel as the package `agnostos.configs`.

pyproject.toml maps this folder to `agnostos.configs`; code finds the files with
`agnostos.resources.packaged_config("demo.yaml")` or `packaged_config("dynamics/tiny.yaml")`.
This file only makes the folder a regular package (the editable install resolves mapped
packages through their `__init__.py`).
"""
