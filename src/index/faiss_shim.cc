/*
** faiss_shim.cc: a small C interface to Faiss (Debian libfaiss-dev 1.7.3),
** used as an optional backend and as the benchmark baseline. Every entry
** point catches every C++ exception and turns it into CLIPDB_ERROR (or
** CLIPDB_ENOMEM) with the message on the handle: nothing escapes into C.
**
** Cosine: vectors and queries are normalised here and the index uses inner
** product. Scores follow clipdb's convention (l2: -distance, Faiss returns
** the squared distance).
*/
extern "C" {
#include "index/index.h"
}

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <new>
#include <string>
#include <vector>

#include <faiss/IVFlib.h>
#include <faiss/Index.h>
#include <faiss/IndexIDMap.h>
#include <faiss/IndexIVF.h>
#include <faiss/impl/AuxIndexStructures.h>
#include <faiss/impl/IDSelector.h>
#include <faiss/impl/io.h>
#include <faiss/index_factory.h>
#include <faiss/index_io.h>
#include <omp.h>

struct cdb_faiss {
    cdb_err err;
    faiss::Index *index = nullptr;  // owned
    clipdb_metric metric = CLIPDB_METRIC_L2;
    int d = 0;
};

namespace {

using idx_t = faiss::Index::idx_t;

// Runs f, turning exceptions into a status and a message on h.
template <class F>
int guarded(cdb_faiss *h, const char *what, F f)
{
    try {
        cdb_err_clear(&h->err);
        f();
        return CLIPDB_OK;
    } catch (const std::bad_alloc &) {
        return cdb_err_set(&h->err, CLIPDB_ENOMEM, "faiss %s: out of memory", what);
    } catch (const std::exception &ex) {
        // Faiss messages span lines ("Error in ... at file:line: msg"): keep one line
        std::string m = ex.what();
        for (char &c : m)
            if (c == '\n' || c == '\r') c = ' ';
        return cdb_err_set(&h->err, CLIPDB_ERROR, "faiss %s: %s", what, m.c_str());
    } catch (...) {
        return cdb_err_set(&h->err, CLIPDB_ERROR, "faiss %s: unknown exception", what);
    }
}

// x (n, d) as the index wants it: normalised copies for cosine.
const float *prepared(const cdb_faiss *h, const float *x, size_t n, std::vector<float> &buf)
{
    if (h->metric != CLIPDB_METRIC_COSINE) return x;
    buf.resize(n * (size_t)h->d);
    cdb_normalize_rows(x, n, h->d, buf.data());
    return buf.data();
}

bool size_ok(size_t n, int d)
{
    size_t t;
    return cdb_mul_ok(n, (size_t)d, &t) && cdb_mul_ok(t, sizeof(float), &t) && n <= (size_t)INT64_MAX;
}

}  // namespace

extern "C" {

int cdb_faiss_new(cdb_faiss **out, int d, const char *factory, clipdb_metric metric)
{
    if (!out) return CLIPDB_EINVAL;
    cdb_faiss *h = new (std::nothrow) cdb_faiss();
    *out = h;
    if (!h) return CLIPDB_ENOMEM;
    h->d = d;
    h->metric = metric;
    if (d < 1 || d > CLIPDB_MAX_DIM)
        return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: dimension %d out of range", d);
    if (!cdb_metric_ok(metric)) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: unknown metric");
    if (!factory) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: factory string is NULL");
    return guarded(h, "index_factory", [&] {
        faiss::MetricType mt = metric == CLIPDB_METRIC_L2 ? faiss::METRIC_L2 : faiss::METRIC_INNER_PRODUCT;
        std::unique_ptr<faiss::Index> idx(faiss::index_factory(d, factory, mt));
        // add_with_ids needs an IVF (which stores ids) or an IndexIDMap around the rest
        if (!faiss::ivflib::try_extract_index_ivf(idx.get()) && !dynamic_cast<faiss::IndexIDMap *>(idx.get())) {
            auto *map = new faiss::IndexIDMap(idx.get());
            map->own_fields = true;
            idx.release();
            idx.reset(map);
        }
        h->index = idx.release();
    });
}

void cdb_faiss_free(cdb_faiss *h)
{
    if (!h) return;
    delete h->index;  // Faiss destructors do not throw
    delete h;
}

const char *cdb_faiss_errmsg(const cdb_faiss *h)
{
    return h ? h->err.msg : "out of memory";
}

int cdb_faiss_train(cdb_faiss *h, const float *x, size_t n)
{
    if (!h || !h->index) return h ? cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: no index") : CLIPDB_EINVAL;
    if ((n && !x) || !size_ok(n, h->d)) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss train: bad arguments");
    return guarded(h, "train", [&] {
        std::vector<float> buf;
        h->index->train((idx_t)n, prepared(h, x, n, buf));
    });
}

int cdb_faiss_add(cdb_faiss *h, const int64_t *ids, const float *x, size_t n)
{
    if (!h || !h->index) return h ? cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: no index") : CLIPDB_EINVAL;
    if ((n && (!x || !ids)) || !size_ok(n, h->d)) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss add: bad arguments");
    return guarded(h, "add", [&] {
        std::vector<float> buf;
        static_assert(sizeof(idx_t) == sizeof(int64_t), "idx_t is 64-bit");
        h->index->add_with_ids((idx_t)n, prepared(h, x, n, buf),
                               reinterpret_cast<const idx_t *>(ids));
    });
}

int cdb_faiss_remove(cdb_faiss *h, const int64_t *ids, size_t n, size_t *n_removed)
{
    if (!h || !h->index) return h ? cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: no index") : CLIPDB_EINVAL;
    if (n && !ids) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss remove: NULL ids");
    return guarded(h, "remove_ids", [&] {
        faiss::IDSelectorBatch sel(n, reinterpret_cast<const idx_t *>(ids));
        size_t r = h->index->remove_ids(sel);
        if (n_removed) *n_removed = r;
    });
}

/* Sets an IVF's nprobe and puts the old value back when it goes out of
** scope. */
struct NprobeScope {
    faiss::IndexIVF *ivf = nullptr;
    size_t saved = 0;
    void set(faiss::IndexIVF *v, size_t nprobe)
    {
        ivf = v;
        saved = v->nprobe;
        v->nprobe = nprobe;
    }
    ~NprobeScope()
    {
        if (ivf) ivf->nprobe = saved;
    }
};

int cdb_faiss_search(cdb_faiss *h, const float *q, size_t nq, int k, int nprobe, clipdb_hit *out)
{
    if (!h || !h->index) return h ? cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: no index") : CLIPDB_EINVAL;
    size_t t;
    if (k < 1 || k > CLIPDB_MAX_K || (nq && (!q || !out)) || !size_ok(nq, h->d) ||
        !cdb_mul_ok(nq, (size_t)k, &t))
        return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss search: bad arguments");
    return guarded(h, "search", [&] {
        std::vector<float> buf, D(nq * (size_t)k);
        std::vector<idx_t> I(nq * (size_t)k);
        // nprobe for this call only: the index's own value is never changed
        // for good. An IVF at the top takes per-call SearchParametersIVF;
        // wrappers (IndexIDMap, IndexPreTransform) refuse parameters in
        // Faiss 1.7.3, so there the value is set for the call and restored
        // (also when search throws) by NprobeScope.
        faiss::IndexIVF *ivf = faiss::ivflib::try_extract_index_ivf(h->index);
        faiss::SearchParametersIVF sp;
        const faiss::SearchParameters *params = nullptr;
        NprobeScope scope;
        if (ivf && nprobe > 0) {
            if (dynamic_cast<faiss::IndexIVF *>(h->index) == ivf) {
                sp.nprobe = (size_t)nprobe;
                sp.max_codes = ivf->max_codes;
                params = &sp;
            } else {
                scope.set(ivf, (size_t)nprobe);
            }
        }
        h->index->search((idx_t)nq, prepared(h, q, nq, buf), k, D.data(), I.data(), params);
        for (size_t i = 0; i < nq * (size_t)k; i++) {
            out[i].id = I[i];
            if (I[i] < 0) out[i].score = -INFINITY;
            else if (h->metric == CLIPDB_METRIC_L2) out[i].score = -std::sqrt(std::max(D[i], 0.0f));
            else out[i].score = D[i];
        }
    });
}

int cdb_faiss_set_train_seed(cdb_faiss *h, int seed)
{
    if (!h || !h->index) return h ? cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: no index") : CLIPDB_EINVAL;
    faiss::IndexIVF *ivf = faiss::ivflib::try_extract_index_ivf(h->index);
    if (!ivf) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: the index is not an IVF (no k-means to seed)");
    ivf->cp.seed = seed;  // Level1Quantizer::train_q1 copies cp into its Clustering
    return CLIPDB_OK;
}

size_t cdb_faiss_ntotal(const cdb_faiss *h)
{
    return h && h->index ? (size_t)h->index->ntotal : 0;
}

int cdb_faiss_nprobe(const cdb_faiss *h)
{
    faiss::IndexIVF *ivf = h && h->index ? faiss::ivflib::try_extract_index_ivf(h->index) : nullptr;
    return ivf ? (int)ivf->nprobe : 0;
}

int cdb_faiss_dim(const cdb_faiss *h)
{
    return h && h->index ? (int)h->index->d : 0;
}

int cdb_faiss_serialize(cdb_faiss *h, uint8_t **buf, size_t *len)
{
    if (!h || !h->index || !buf || !len) return h ? cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss serialize: bad arguments") : CLIPDB_EINVAL;
    *buf = nullptr;
    *len = 0;
    return guarded(h, "write_index", [&] {
        faiss::VectorIOWriter w;
        faiss::write_index(h->index, &w);
        uint8_t *p = (uint8_t *)malloc(w.data.size() ? w.data.size() : 1);
        if (!p) throw std::bad_alloc();
        memcpy(p, w.data.data(), w.data.size());
        *buf = p;
        *len = w.data.size();
    });
}

int cdb_faiss_deserialize(cdb_faiss **out, const uint8_t *buf, size_t len, clipdb_metric metric)
{
    if (!out) return CLIPDB_EINVAL;
    cdb_faiss *h = new (std::nothrow) cdb_faiss();
    *out = h;
    if (!h) return CLIPDB_ENOMEM;
    h->metric = metric;
    if (!buf && len) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss read_index: NULL buffer");
    if (!cdb_metric_ok(metric)) return cdb_err_set(&h->err, CLIPDB_EINVAL, "faiss: unknown metric");
    return guarded(h, "read_index", [&] {
        faiss::VectorIOReader r;
        r.data.assign(buf, buf + len);
        std::unique_ptr<faiss::Index> idx(faiss::read_index(&r));
        bool ip = idx->metric_type == faiss::METRIC_INNER_PRODUCT;
        if (ip != (metric != CLIPDB_METRIC_L2))
            throw std::runtime_error("the stored index's metric does not match the requested one");
        h->d = idx->d;
        h->index = idx.release();
    });
}

void cdb_faiss_after_fork(void)
{
    omp_set_num_threads(1);  // see index.h. OpenBLAS has its own fork handler: its threads restart
}

}  // extern "C"
