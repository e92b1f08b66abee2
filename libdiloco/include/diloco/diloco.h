// libdiloco: train one model on several islands of compute joined by a slow link.
// The umbrella header: include this one.
#pragma once

#include "diloco/audit/audit.h"
#include "diloco/comm/auth.h"
#include "diloco/comm/comm_stats.h"
#include "diloco/comm/group.h"
#include "diloco/elastic/membership.h"
#include "diloco/errors.h"
#include "diloco/exchange/exchange.h"
#include "diloco/optim/muon.h"
#include "diloco/outer/outer_sgd.h"
#include "diloco/sync/buffers.h"
#include "diloco/sync/checkpoint.h"
#include "diloco/sync/data_parallel.h"
#include "diloco/sync/diloco.h"
#include "diloco/sync/outer_state.h"
#include "diloco/sync/fingerprint.h"
#include "diloco/sync/parameters.h"
#include "diloco/sync/schedule.h"
#include "diloco/sync/speed_balancer.h"
#include "diloco/version.h"
