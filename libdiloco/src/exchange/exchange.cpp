// Exchange::from_spec and what every exchange shares (see exchange.h).
#include "diloco/exchange/exchange.h"

#include <ATen/core/grad_mode.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <map>

#include "compress/spec_parse.h"
#include "diloco/compress/codec_params.h"
#include "diloco/compress/registry.h"
#include "diloco/errors.h"
#include "diloco/exchange/error_feedback.h"
#include "diloco/exchange/powersgd.h"
#include "exchange/codec_exchange.h"

namespace diloco {

void PendingExchange::wait() {
  for (auto& c : collectives_) c.wait();
  job_.wait();
}

bool PendingExchange::ready() {
  for (auto& c : collectives_) {
    if (!c.ready()) return false;
  }
  return job_.ready();
}

PendingExchange Exchange::pending(at::Tensor flat, std::vector<PendingCollective> collectives,
                                  CommThread::Job job) {
  PendingExchange p;
  p.flat_ = std::move(flat);
  p.collectives_ = std::move(collectives);
  p.job_ = std::move(job);
  return p;
}

at::Tensor Exchange::finish(PendingExchange& pending) {
  pending.wait();
  return pending.flat_;
}

void Exchange::sum(Group& group, at::Tensor& flat, const std::vector<at::Tensor>& views,
                   const std::string& label) {
  at::NoGradGuard no_grad;
  CommThread inline_thread(/*background=*/false);
  ExchangeRequest request;
  request.flat = flat;
  request.views = views;
  request.label = label;
  PendingExchange p = start(group, std::move(request), inline_thread);
  finish(p);
}

const std::vector<at::Tensor>& Exchange::residuals() const {
  static const std::vector<at::Tensor> none;
  return none;
}

void Exchange::save(torch::serialize::OutputArchive& archive) const {
  archive.write("spec", c10::IValue(spec()));
}

void Exchange::load(torch::serialize::InputArchive& archive) { check_saved_spec(archive); }

void Exchange::check_saved_spec(torch::serialize::InputArchive& archive) const {
  c10::IValue saved;
  archive.read("spec", saved);
  if (saved.toStringRef() != spec()) {
    throw Error("[compression] the saved state is of '" + saved.toStringRef() +
                "', this exchange is '" + spec() + "'");
  }
}

PendingExchange Exchange::start_on_comm_thread(Group& group, ExchangeRequest request,
                                               CommThread& comm) {
  TORCH_CHECK(request.flat.device().is_cpu() && request.flat.scalar_type() == at::kFloat &&
                  request.flat.is_contiguous(),
              "[compression] the pseudo-gradient buffer must be contiguous float32 on the CPU");
  if (request.produce) {
    request.produce(0, request.flat.numel());
    request.produce = nullptr;
  }
  at::Tensor flat = request.flat;
  auto job = comm.submit([this, &group, request = std::move(request)] {
    at::NoGradGuard no_grad;
    run(group, request);
  });
  return pending(std::move(flat), {}, std::move(job));
}

void Exchange::run(Group&, const ExchangeRequest&) {
  throw Error("[exchange] '" + spec() + "' has no blocking implementation to run");
}

std::unique_ptr<Exchange> Exchange::from_spec(const std::string& spec,
                                              const std::string& aggregator_spec, bool gather) {
  const Aggregator aggregator = Aggregator::parse(aggregator_spec);
  // "BASE+ef" or "BASE+ef(beta=B)": error feedback over the exchange of BASE.
  std::string base = spec;
  bool ef = false;
  double beta = 1.0;
  const auto plus = spec.rfind("+ef");
  if (plus != std::string::npos) {
    const std::string tail = spec.substr(plus + 3);
    if (tail.empty() || tail.front() == '(') {
      base = spec.substr(0, plus);
      ef = true;
      if (!tail.empty()) {
        if (tail.back() != ')') {
          throw OptionError("[compression] malformed '+ef" + tail + "' in '" + spec + "'");
        }
        const std::string inner = tail.substr(1, tail.size() - 2);
        const std::string key = "beta=";
        if (inner.rfind(key, 0) != 0) {
          throw OptionError("[compression] ef takes one parameter, beta (in [0, 1]), got '" +
                            inner + "'");
        }
        std::map<std::string, std::string> values{{"beta", inner.substr(key.size())}};
        CodecParams p("ef", values);
        beta = p.get_double("beta", 1.0, 0.0, 1.0);
      }
    }
  }
  std::unique_ptr<Exchange> exchange;
  auto [name, values] = parse_spec(base);
  if (name == "none" && values.empty() && !aggregator.robust() && !gather) {
    exchange = make_all_reduce_exchange();
  } else if (name == "powersgd") {
    if (aggregator.robust() || gather) {
      throw OptionError("[DiLoCo] " +
                        (gather ? std::string("audits (audit_rate > 0) need")
                                : "aggregator " + aggregator.spec() + " needs") +
                        " each island's contribution, which PowerSGD never has (it sums "
                        "low-rank factors): use none or a codec" +
                        (gather ? "" : ", or use the mean"));
    }
    CodecParams params(name, values);
    exchange = std::make_unique<PowerSGD>(PowerSGD::Options::from_params(params));
    params.reject_unknown();
  } else {
    exchange = CodecExchange::make(make_codec(base), aggregator, gather);
  }
  if (!ef) return exchange;
  return std::make_unique<ErrorFeedback>(std::move(exchange), beta);
}

}  // namespace diloco
