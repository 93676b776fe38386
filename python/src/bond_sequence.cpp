// Placeholder until the bond_sequence CPU launcher lands (its owner replaces this file): registers nothing,
// so _C.cpu simply lacks `bond_sequence` and the backend layer reports it unavailable.
#include "bindings.h"

void register_bond_sequence_cpu(pybind11::module_& cpu) { (void)cpu; }
