"""glm: BLOOM, GLM-130B and UL2-style language models in JAX/Flax.

Import names: the repository folder `glm/` is `glm`, `data/` is `glm.data`
and `pallas_kernels/` is `glm.pallas_kernels`; nothing generic is installed at
the top level of site-packages.
"""

import setuptools

# The working set that installs together on Python 3.11 (pins checked with
# `pip check`).
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'flax==0.12.8',
    'optax==0.2.8',
    'orbax-checkpoint==0.12.8',
    'numpy==2.4.6',
    'sentencepiece==0.2.3',
    'gin-config==0.5.0',
    'seqio==0.0.20',
    'tensorflow==2.21.0',
    'tensorflow-text==2.21.1',
    'tensorflow-datasets==4.9.10',
    'protobuf==7.36.2',
    # Reads and writes Hugging Face weights (glm convert) and tokenizers
    # (tokenizer.json: score, generate and fine-tuning of converted models).
    'safetensors==0.8.0',
    'tokenizers==0.22.2',
    # Evaluation (glm eval): EleutherAI's lm-evaluation-harness and what it
    # pulls in, pinned to versions that install beside transformers 4.57
    # (datasets 5.1+ wants huggingface-hub 1.x, transformers 4.57 wants < 1).
    'lm-eval==0.4.13',
    'datasets==5.0.1',
    'fsspec==2026.6.0',
    'huggingface_hub==0.36.2',
    'evaluate==0.4.6',
    'sacrebleu==2.6.0',
    'rouge-score==0.1.2',
    'sqlitedict==2.1.0',
    'word2number==1.1',
    'pytablewriter==1.2.1',
    'scikit-learn==1.9.1',
    'more-itertools==11.2.1',
    'dill==0.4.1',
    'multiprocess==0.70.19',
    'pandas==3.1.1',
    'pyarrow==26.0.1',
    'xxhash==4.1.0',
    'nltk==3.10.4',
    # glm sweep and glm plot draw PNGs; sweep files are YAML.
    'matplotlib==3.11.2',
    'contourpy==1.3.3',
    'cycler==0.12.1',
    'fonttools==4.68.0',
    'kiwisolver==1.5.1',
    'pillow==13.0.0',
    'pyparsing==3.3.3',
    'PyYAML==6.0.4',
]

# Test-only packages: Hugging Face parity needs torch (CPU wheel) and
# transformers. torch is always pinned: an open range pulls CUDA wheels.
EXTRAS_REQUIRE = {
    'dev': [
        'pytest==9.2.0',
        # `make test` runs the suite on two workers (one per core of CI).
        'pytest-xdist==3.8.0',
        'execnet==2.1.2',
        'torch==2.13.0',
        'transformers==4.57.6',
        # lm-eval's own `hf` model (the parity test of glm eval): the hf
        # extra, with what it adds pinned.
        'lm-eval[hf]==0.4.13',
        'accelerate==1.15.0',
        'peft==0.21.2',
        # The notebooks run in a Jupyter kernel (tests/test_notebooks.py):
        # nbclient, nbformat, ipykernel and what they pull in.
        'nbclient==0.11.0',
        'nbformat==5.11.1',
        'ipykernel==7.4.0',
        'jupyter_client==8.10.0',
        'jupyter_core==5.9.1',
        'traitlets==5.16.1',
        'fastjsonschema==2.22.3',
        'jsonschema==4.26.0',
        'jsonschema-specifications==2025.9.1',
        'referencing==0.37.0',
        'rpds-py==2026.9.1',
        'platformdirs==4.14.9',
        'ipython==9.18.1',
        'ipython_pygments_lexers==1.1.1',
        'comm==0.2.3',
        'debugpy==1.8.22',
        'pyzmq==27.3.0',
        'tornado==6.6.1',
        'matplotlib-inline==0.2.2',
        'nest-asyncio2==1.7.4',
        'jedi==0.20.1',
        'parso==0.8.7',
        'prompt_toolkit==3.0.53',
        'wcwidth==0.9.4',
        'stack-data==0.6.3',
        'asttokens==3.0.2',
        'executing==2.3.0',
        'pure_eval==0.2.4',
        'pexpect==4.9.0',
        'ptyprocess==0.7.0',
    ],
}

setuptools.setup(
    name='glm',
    version='0.1.0',
    description=('BLOOM, GLM-130B and UL2-style language models in JAX/Flax: '
                 'training, sharding, Pallas kernels and HF interop.'),
    python_requires='>=3.11',
    packages=[*setuptools.find_packages(include=['glm', 'glm.*']),
              'glm.data', 'glm.pallas_kernels'],
    package_dir={
        'glm': 'glm',
        'glm.data': 'data',
        'glm.pallas_kernels': 'pallas_kernels',
    },
    package_data={'glm.evaluation': ['tasks/*.yaml', 'tasks/*.py',
                                    'tasks/_*']},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={'console_scripts': ['glm = glm.cli:main']},
)
