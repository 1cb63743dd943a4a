// edgefuse/edgefuse.h — umbrella header for the core library (edgefuse::edgefuse).
//
// edgefuse fuses what many small edge-device models learned into one large target model: the
// server half of heterogeneous federated learning at LLM scale (see docs/architecture.md).
// This header pulls in the core types, the SIMD kernels and the checkpoint io; it never
// includes LibTorch (that is edgefuse/interop/torch.h, target edgefuse::torch).
#pragma once

#include "edgefuse/core/dtype.h"
#include "edgefuse/core/error.h"
#include "edgefuse/core/parallel.h"
#include "edgefuse/core/tensor.h"
#include "edgefuse/distill/loss.h"
#include "edgefuse/distill/signals.h"
#include "edgefuse/distill/teacher.h"
#include "edgefuse/engine/fuse.h"
#include "edgefuse/aggregate/aggregator.h"
#include "edgefuse/extract/extract.h"
#include "edgefuse/io/checkpoint.h"
#include "edgefuse/io/peft.h"
#include "edgefuse/io/safetensors.h"
#include "edgefuse/kernels/accumulate.h"
#include "edgefuse/kernels/convert.h"
#include "edgefuse/kernels/finalize.h"
#include "edgefuse/kernels/lora_update.h"
#include "edgefuse/kernels/scatter.h"
#include "edgefuse/kernels/target.h"
#include "edgefuse/kernels/triad.h"
#include "edgefuse/lora/adapter.h"
#include "edgefuse/lora/combine.h"
#include "edgefuse/lora/federated.h"
#include "edgefuse/lora/task_merge.h"
#include "edgefuse/plan/plan.h"
#include "edgefuse/plan/policies.h"
#include "edgefuse/plan/schema.h"
