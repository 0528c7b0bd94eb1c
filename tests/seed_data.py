"""Data shared by tests: the seed's own session template."""

# The seed's own session template (the 2018 form), copied as data from
# shared/seed/trusted-dapps-with-scone-and-iexec.txt, "Session specific keys".
SEED_TEMPLATE = """\
name: $SESSION
digest: create

services:
   - name: application
     image_name: sconecuratedimages/iexecsgx:copy_demo
     mrenclaves: [e0f45a9a862c83f383730cc2aef144081025e3f925615da5b35c4d980faaa3c9]
     tags: [demo]
     command: /application
     pwd: /
     environment:
        SCONE_MODE: hw

volumes:
   - name: encrypted-input-files
     fspf_tag: $INPUT_FSPF_TAG
     fspf_key: $INPUT_FSPF_KEY
   - name: encrypted-output-files
     fspf_tag: $OUTPUT_FSPF_TAG
     fspf_key: $OUTPUT_FSPF_KEY

images:
   - name: sconecuratedimages/iexecsgx:copy_demo
     mrenclaves: [e0f45a9a862c83f383730cc2aef144081025e3f925615da5b35c4d980faaa3c9]
     tags: [demo]
     volumes:
        - name: encrypted-input-files
          path: /encryptedInputs
        - name: encrypted-output-files
          path: /encryptedOutputs
"""

