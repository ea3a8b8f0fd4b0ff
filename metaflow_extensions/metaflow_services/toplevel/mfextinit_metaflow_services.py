# Loaded by Metaflow at the end of `import metaflow` (its "toplevel"
# extension point). See prebuilt_environments.py.
toplevel = "prebuilt_environments"
