"""A reusable library of engine tasks defined without an app, and a project that uses it."""
