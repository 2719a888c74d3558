// Emulation stand-in for <cuda_runtime_api.h>: see cuda_emu.h.
#pragma once
#include "cuda_emu.h"
