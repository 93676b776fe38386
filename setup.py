# placeholder: replaced by the C++ backend work
from setuptools import setup

setup()
