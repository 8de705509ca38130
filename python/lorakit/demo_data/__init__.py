"""The demo's data: facts about invented countries (see :mod:`lorakit.demo_data.facts`)."""
