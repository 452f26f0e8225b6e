"""Emitters: a rewritten module → an artifact on disk, reloaded and checked for parity with the module.

Each emitter is `emit(module, captured, out_dir) -> Artifact`, registered under the
`rewrite.emitters` entry-point group like passes are.
"""
