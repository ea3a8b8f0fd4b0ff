# Loaded by Metaflow at the end of `import metaflow` (its "toplevel"
# extension point). See metaflow_services_toplevel.py.
toplevel = "metaflow_services_toplevel"
