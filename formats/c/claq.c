/*
 * claq.c - a reference reader for .claq files, versions 1 to 4, written from formats/claq-v2.md alone
 * (see claq.h).
 *
 * C99, libc only (zlib behind CLAQ_WITH_ZLIB). Every length, count, offset and product taken from a
 * file is checked (for overflow and against the file's size) before it is used to index, allocate or
 * loop; every failure is one of the spec's error categories with a one-line message (those of the
 * version-4 rules CLAQ-T06, T19-T23 and H35 end with the rule's id in parentheses).
 */
#include "claq.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef CLAQ_WITH_ZLIB
#define ZLIB_CONST /* next_in is a pointer to const (zlib >= 1.2.5.2) */
#include <zlib.h>
#endif

#define ALIGNMENT 64u
#define MAX_HEADER 67108864u         /* section 1, rule 2 */
#define MAX_DEPTH 64                  /* section 1, rule 3 */
#define MAX_INT_DIGITS 20             /* section 1, rule 3 */
#define MAX_EMBEDDED_SIZE 268435456u  /* section 2: an embedded file's `size` */
#define NONE ((size_t)-1)

/* ------------------------------------------------------------------------------------------ basics */

static const char *const STATUS_NAMES[] = {
    "OK", "TruncatedFile", "BadMagic", "UnsupportedVersion", "BadHeader", "BadLayout",
    "ChecksumMismatch", "BadTensorData", "BadFileData", "NotInflatable", "IOError", "OutOfMemory",
    "InvalidArgument"};

const char *claq_status_name(claq_status status) {
    if ((unsigned)status < sizeof STATUS_NAMES / sizeof STATUS_NAMES[0]) return STATUS_NAMES[status];
    return "Unknown";
}

int claq_have_zlib(void) {
#ifdef CLAQ_WITH_ZLIB
    return 1;
#else
    return 0;
#endif
}

static claq_status fail(claq_error *err, claq_status status, const char *fmt, ...) {
    if (err) {
        va_list ap;
        size_t i;
        err->status = status;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
        for (i = 0; err->message[i]; i++) /* one line of printable text, whatever went in */
            if ((unsigned char)err->message[i] < 0x20 || (unsigned char)err->message[i] == 0x7f)
                err->message[i] = '?';
    }
    return status;
}

static claq_status succeed(claq_error *err) {
    if (err) {
        err->status = CLAQ_OK;
        err->message[0] = '\0';
    }
    return CLAQ_OK;
}

/* A name for a message: quoted, non-printable and non-ASCII bytes as \xHH, cut to fit `cap` (>= 16). */
static const char *quote(char *buf, size_t cap, const char *s, size_t n) {
    size_t o = 0, i;
    buf[o++] = '"';
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (o + 10 > cap) {
            memcpy(buf + o, "...", 3);
            o += 3;
            break;
        }
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
            buf[o++] = (char)c;
        } else {
            static const char hex[] = "0123456789abcdef";
            buf[o++] = '\\';
            buf[o++] = 'x';
            buf[o++] = hex[c >> 4];
            buf[o++] = hex[c & 15];
        }
    }
    buf[o++] = '"';
    buf[o] = '\0';
    return buf;
}

static int add_u64(uint64_t a, uint64_t b, uint64_t *r) {
    if (b > UINT64_MAX - a) return 0;
    *r = a + b;
    return 1;
}

static int mul_u64(uint64_t a, uint64_t b, uint64_t *r) {
    if (a != 0 && b > UINT64_MAX / a) return 0;
    *r = a * b;
    return 1;
}

static int align_up(uint64_t v, uint64_t *r) { /* round up to a multiple of 64 */
    if (v > UINT64_MAX - (ALIGNMENT - 1)) return 0;
    *r = (v + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT;
    return 1;
}

static uint16_t rd16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t rd32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t rd64(const unsigned char *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }

static float bits_to_float(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* IEEE binary16 -> binary32, exactly (NaN payloads kept, shifted as hardware does). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: man * 2^-24 */
            uint32_t shift = 0;
            while (!(man & 0x400u)) {
                man <<= 1;
                shift++;
            }
            bits = sign | ((113u - shift) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return bits_to_float(bits);
}

static int half_is_finite(uint16_t h) { return ((h >> 10) & 0x1fu) != 31; }

static int float_is_finite(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return ((bits >> 23) & 0xffu) != 0xffu;
}

/* binary32(offset + step * level): the product of an fp16 step and a level < 256 and the sum with an fp16
 * offset are exact in binary64 (spec section 5), so one rounding to binary32 at the end gives the value. */
static float grid_entry(uint16_t offset, uint16_t step, unsigned level) {
    double sum = (double)half_to_float(offset) + (double)half_to_float(step) * (double)level;
    return (float)sum;
}

static const uint32_t CRC_TABLE[256] = {
    0x00000000u, 0x77073096u, 0xee0e612cu, 0x990951bau, 0x076dc419u, 0x706af48fu,
    0xe963a535u, 0x9e6495a3u, 0x0edb8832u, 0x79dcb8a4u, 0xe0d5e91eu, 0x97d2d988u,
    0x09b64c2bu, 0x7eb17cbdu, 0xe7b82d07u, 0x90bf1d91u, 0x1db71064u, 0x6ab020f2u,
    0xf3b97148u, 0x84be41deu, 0x1adad47du, 0x6ddde4ebu, 0xf4d4b551u, 0x83d385c7u,
    0x136c9856u, 0x646ba8c0u, 0xfd62f97au, 0x8a65c9ecu, 0x14015c4fu, 0x63066cd9u,
    0xfa0f3d63u, 0x8d080df5u, 0x3b6e20c8u, 0x4c69105eu, 0xd56041e4u, 0xa2677172u,
    0x3c03e4d1u, 0x4b04d447u, 0xd20d85fdu, 0xa50ab56bu, 0x35b5a8fau, 0x42b2986cu,
    0xdbbbc9d6u, 0xacbcf940u, 0x32d86ce3u, 0x45df5c75u, 0xdcd60dcfu, 0xabd13d59u,
    0x26d930acu, 0x51de003au, 0xc8d75180u, 0xbfd06116u, 0x21b4f4b5u, 0x56b3c423u,
    0xcfba9599u, 0xb8bda50fu, 0x2802b89eu, 0x5f058808u, 0xc60cd9b2u, 0xb10be924u,
    0x2f6f7c87u, 0x58684c11u, 0xc1611dabu, 0xb6662d3du, 0x76dc4190u, 0x01db7106u,
    0x98d220bcu, 0xefd5102au, 0x71b18589u, 0x06b6b51fu, 0x9fbfe4a5u, 0xe8b8d433u,
    0x7807c9a2u, 0x0f00f934u, 0x9609a88eu, 0xe10e9818u, 0x7f6a0dbbu, 0x086d3d2du,
    0x91646c97u, 0xe6635c01u, 0x6b6b51f4u, 0x1c6c6162u, 0x856530d8u, 0xf262004eu,
    0x6c0695edu, 0x1b01a57bu, 0x8208f4c1u, 0xf50fc457u, 0x65b0d9c6u, 0x12b7e950u,
    0x8bbeb8eau, 0xfcb9887cu, 0x62dd1ddfu, 0x15da2d49u, 0x8cd37cf3u, 0xfbd44c65u,
    0x4db26158u, 0x3ab551ceu, 0xa3bc0074u, 0xd4bb30e2u, 0x4adfa541u, 0x3dd895d7u,
    0xa4d1c46du, 0xd3d6f4fbu, 0x4369e96au, 0x346ed9fcu, 0xad678846u, 0xda60b8d0u,
    0x44042d73u, 0x33031de5u, 0xaa0a4c5fu, 0xdd0d7cc9u, 0x5005713cu, 0x270241aau,
    0xbe0b1010u, 0xc90c2086u, 0x5768b525u, 0x206f85b3u, 0xb966d409u, 0xce61e49fu,
    0x5edef90eu, 0x29d9c998u, 0xb0d09822u, 0xc7d7a8b4u, 0x59b33d17u, 0x2eb40d81u,
    0xb7bd5c3bu, 0xc0ba6cadu, 0xedb88320u, 0x9abfb3b6u, 0x03b6e20cu, 0x74b1d29au,
    0xead54739u, 0x9dd277afu, 0x04db2615u, 0x73dc1683u, 0xe3630b12u, 0x94643b84u,
    0x0d6d6a3eu, 0x7a6a5aa8u, 0xe40ecf0bu, 0x9309ff9du, 0x0a00ae27u, 0x7d079eb1u,
    0xf00f9344u, 0x8708a3d2u, 0x1e01f268u, 0x6906c2feu, 0xf762575du, 0x806567cbu,
    0x196c3671u, 0x6e6b06e7u, 0xfed41b76u, 0x89d32be0u, 0x10da7a5au, 0x67dd4accu,
    0xf9b9df6fu, 0x8ebeeff9u, 0x17b7be43u, 0x60b08ed5u, 0xd6d6a3e8u, 0xa1d1937eu,
    0x38d8c2c4u, 0x4fdff252u, 0xd1bb67f1u, 0xa6bc5767u, 0x3fb506ddu, 0x48b2364bu,
    0xd80d2bdau, 0xaf0a1b4cu, 0x36034af6u, 0x41047a60u, 0xdf60efc3u, 0xa867df55u,
    0x316e8eefu, 0x4669be79u, 0xcb61b38cu, 0xbc66831au, 0x256fd2a0u, 0x5268e236u,
    0xcc0c7795u, 0xbb0b4703u, 0x220216b9u, 0x5505262fu, 0xc5ba3bbeu, 0xb2bd0b28u,
    0x2bb45a92u, 0x5cb36a04u, 0xc2d7ffa7u, 0xb5d0cf31u, 0x2cd99e8bu, 0x5bdeae1du,
    0x9b64c2b0u, 0xec63f226u, 0x756aa39cu, 0x026d930au, 0x9c0906a9u, 0xeb0e363fu,
    0x72076785u, 0x05005713u, 0x95bf4a82u, 0xe2b87a14u, 0x7bb12baeu, 0x0cb61b38u,
    0x92d28e9bu, 0xe5d5be0du, 0x7cdcefb7u, 0x0bdbdf21u, 0x86d3d2d4u, 0xf1d4e242u,
    0x68ddb3f8u, 0x1fda836eu, 0x81be16cdu, 0xf6b9265bu, 0x6fb077e1u, 0x18b74777u,
    0x88085ae6u, 0xff0f6a70u, 0x66063bcau, 0x11010b5cu, 0x8f659effu, 0xf862ae69u,
    0x616bffd3u, 0x166ccf45u, 0xa00ae278u, 0xd70dd2eeu, 0x4e048354u, 0x3903b3c2u,
    0xa7672661u, 0xd06016f7u, 0x4969474du, 0x3e6e77dbu, 0xaed16a4au, 0xd9d65adcu,
    0x40df0b66u, 0x37d83bf0u, 0xa9bcae53u, 0xdebb9ec5u, 0x47b2cf7fu, 0x30b5ffe9u,
    0xbdbdf21cu, 0xcabac28au, 0x53b39330u, 0x24b4a3a6u, 0xbad03605u, 0xcdd70693u,
    0x54de5729u, 0x23d967bfu, 0xb3667a2eu, 0xc4614ab8u, 0x5d681b02u, 0x2a6f2b94u,
    0xb40bbe37u, 0xc30c8ea1u, 0x5a05df1bu, 0x2d02ef8du
};

static uint32_t crc32_of(const unsigned char *p, uint64_t n) {
    uint32_t c = 0xffffffffu;
    uint64_t i;
    for (i = 0; i < n; i++) c = CRC_TABLE[(c ^ p[i]) & 0xffu] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

/* ------------------------------------------------------------------------------------ dtypes */

static const struct {
    const char *name;
    unsigned size;
} DTYPES[] = {{"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F64", 8}, {"I64", 8}, {"I32", 4},
              {"I16", 2}, {"I8", 1},  {"U8", 1},   {"U16", 2}, {"U32", 4}};
#define N_DTYPES (sizeof DTYPES / sizeof DTYPES[0])

/* --------------------------------------------------------------------------------- strict JSON */

enum { J_NULL, J_FALSE, J_TRUE, J_INT, J_FLOAT, J_STR, J_ARR, J_OBJ };

typedef struct jnode {
    unsigned char type;
    unsigned char neg; /* J_INT: the literal had a minus sign */
    uint64_t mag;      /* J_INT: magnitude */
    size_t s, slen;    /* J_STR: its decoded text in the pool (NUL-terminated) */
    size_t k, klen;    /* a member of an object: its decoded key in the pool */
    size_t first, count, next; /* containers: first child, number of children; every node: next sibling */
} jnode;

typedef struct jparser {
    const unsigned char *src;
    size_t len, pos;
    jnode *nodes;
    size_t n, cap;
    char *pool;
    size_t pool_used, pool_cap;
    claq_status status; /* of the failure: CLAQ_BAD_HEADER or CLAQ_OUT_OF_MEMORY */
    char msg[200];
} jparser;

static size_t jfail(jparser *p, const char *what) {
    if (p->status == CLAQ_OK) {
        p->status = CLAQ_BAD_HEADER;
        snprintf(p->msg, sizeof p->msg, "header: %s at byte %lu of the JSON", what, (unsigned long)p->pos);
    }
    return NONE;
}

static size_t joom(jparser *p) {
    if (p->status == CLAQ_OK) {
        p->status = CLAQ_OUT_OF_MEMORY;
        snprintf(p->msg, sizeof p->msg, "out of memory parsing the header");
    }
    return NONE;
}

static size_t new_node(jparser *p, unsigned char type) {
    jnode *nd;
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        jnode *grown;
        if (cap < p->cap || cap > ((size_t)-1) / sizeof(jnode)) return joom(p);
        grown = (jnode *)realloc(p->nodes, cap * sizeof(jnode));
        if (!grown) return joom(p);
        p->nodes = grown;
        p->cap = cap;
    }
    nd = &p->nodes[p->n];
    memset(nd, 0, sizeof *nd);
    nd->type = type;
    nd->first = NONE;
    nd->next = NONE;
    return p->n++;
}

static void skip_ws(jparser *p) {
    while (p->pos < p->len) {
        unsigned char c = p->src[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int hex4(jparser *p, unsigned *out) {
    unsigned v = 0, i;
    if (p->len - p->pos < 4) return 0;
    for (i = 0; i < 4; i++) {
        unsigned char c = p->src[p->pos + i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return 0;
    }
    p->pos += 4;
    *out = v;
    return 1;
}

static int pool_put(jparser *p, unsigned char c) {
    if (p->pool_used >= p->pool_cap) return 0; /* cannot happen: decoded text is shorter than its source */
    p->pool[p->pool_used++] = (char)c;
    return 1;
}

/* A string at p->pos (on its opening quote): decoded into the pool. Returns 0 on failure. */
static int parse_string(jparser *p, size_t *off, size_t *len) {
    size_t start = p->pool_used;
    p->pos++; /* the quote */
    for (;;) {
        unsigned char c;
        if (p->pos >= p->len) return jfail(p, "unterminated string"), 0;
        c = p->src[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20) return jfail(p, "control character in a string"), 0;
        if (c != '\\') { /* UTF-8 was checked for the whole header already */
            if (!pool_put(p, c)) return jfail(p, "string pool overflow"), 0;
            p->pos++;
            continue;
        }
        p->pos++;
        if (p->pos >= p->len) return jfail(p, "unterminated string"), 0;
        c = p->src[p->pos++];
        switch (c) {
        case '"': case '\\': case '/': break;
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'n': c = '\n'; break;
        case 'r': c = '\r'; break;
        case 't': c = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            int ok = 1;
            if (!hex4(p, &cp)) return jfail(p, "bad \\u escape"), 0;
            if (cp >= 0xdc00 && cp <= 0xdfff) return jfail(p, "lone surrogate in a string"), 0;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (p->len - p->pos < 2 || p->src[p->pos] != '\\' || p->src[p->pos + 1] != 'u')
                    return jfail(p, "lone surrogate in a string"), 0;
                p->pos += 2;
                if (!hex4(p, &lo)) return jfail(p, "bad \\u escape"), 0;
                if (lo < 0xdc00 || lo > 0xdfff) return jfail(p, "lone surrogate in a string"), 0;
                cp = 0x10000u + ((cp - 0xd800u) << 10) + (lo - 0xdc00u);
            }
            if (cp < 0x80) {
                ok = pool_put(p, (unsigned char)cp);
            } else if (cp < 0x800) {
                ok = pool_put(p, (unsigned char)(0xc0 | (cp >> 6))) && pool_put(p, (unsigned char)(0x80 | (cp & 0x3f)));
            } else if (cp < 0x10000) {
                ok = pool_put(p, (unsigned char)(0xe0 | (cp >> 12))) &&
                     pool_put(p, (unsigned char)(0x80 | ((cp >> 6) & 0x3f))) &&
                     pool_put(p, (unsigned char)(0x80 | (cp & 0x3f)));
            } else {
                ok = pool_put(p, (unsigned char)(0xf0 | (cp >> 18))) &&
                     pool_put(p, (unsigned char)(0x80 | ((cp >> 12) & 0x3f))) &&
                     pool_put(p, (unsigned char)(0x80 | ((cp >> 6) & 0x3f))) &&
                     pool_put(p, (unsigned char)(0x80 | (cp & 0x3f)));
            }
            if (!ok) return jfail(p, "string pool overflow"), 0;
            continue;
        }
        default:
            return jfail(p, "invalid escape in a string"), 0;
        }
        if (!pool_put(p, c)) return jfail(p, "string pool overflow"), 0;
    }
    *off = start;
    *len = p->pool_used - start;
    if (!pool_put(p, 0)) return jfail(p, "string pool overflow"), 0;
    return 1;
}

/* The digits of 2^1024 - 2^970, the least positive real that rounds (to nearest, ties to even) to
 * infinity in binary64: a decimal literal is "outside the range of a binary64 double" exactly when its
 * magnitude is at least this. Comparing digits avoids strtod (locale, speed on long literals). */
static const char OVERFLOW_DIGITS[] =
    "17976931348623158079372897140530341507993413271003782693617377898044496829276475"
    "09466490179775872070963302864166928879109465555478519404026306574886715058206819"
    "08902000708383676273854845817711531764475730270069855571366959622842914819860834"
    "936475292719074168444365510704342711559699508093042880177904174497792";
#define OVERFLOW_EXP10 309 /* the threshold is 0.<digits> * 10^309 */

static int float_overflows(const unsigned char *ip, size_t ilen, const unsigned char *fp, size_t flen,
                           long long exp10) {
    size_t total = ilen + flen, z = 0, t;
    long long e;
    const size_t tn = sizeof OVERFLOW_DIGITS - 1;
#define DIGIT(i) ((i) < ilen ? ip[(i)] : fp[(i) - ilen])
    while (z < total && DIGIT(z) == '0') z++;
    if (z == total) return 0; /* zero */
    e = (long long)ilen - (long long)z + exp10; /* value = 0.D[z..] * 10^e; |exp10| <= 10^15, ilen < 2^26 */
    if (e != OVERFLOW_EXP10) return e > OVERFLOW_EXP10;
    for (t = 0;; t++) {
        size_t i = z + t;
        if (i >= total) { /* digits exhausted: below the threshold unless the rest of it is zeros */
            for (; t < tn; t++)
                if (OVERFLOW_DIGITS[t] != '0') return 0;
            return 1;
        }
        if (t >= tn) return 1;
        if (DIGIT(i) != (unsigned char)OVERFLOW_DIGITS[t]) return DIGIT(i) > (unsigned char)OVERFLOW_DIGITS[t];
    }
#undef DIGIT
}

static int is_digit(jparser *p) { return p->pos < p->len && p->src[p->pos] >= '0' && p->src[p->pos] <= '9'; }

static size_t parse_number(jparser *p) {
    size_t istart, ilen, fstart = 0, flen = 0, idx;
    int neg = 0, is_float = 0;
    long long exp10 = 0;
    if (p->src[p->pos] == '-') {
        neg = 1;
        p->pos++;
    }
    if (!is_digit(p)) return jfail(p, "bad number");
    istart = p->pos;
    if (p->src[p->pos] == '0') p->pos++;
    else
        while (is_digit(p)) p->pos++;
    ilen = p->pos - istart;
    if (p->pos < p->len && p->src[p->pos] == '.') {
        p->pos++;
        fstart = p->pos;
        while (is_digit(p)) p->pos++;
        flen = p->pos - fstart;
        if (flen == 0) return jfail(p, "bad number");
        is_float = 1;
    }
    if (p->pos < p->len && (p->src[p->pos] == 'e' || p->src[p->pos] == 'E')) {
        int eneg = 0;
        p->pos++;
        if (p->pos < p->len && (p->src[p->pos] == '+' || p->src[p->pos] == '-')) eneg = p->src[p->pos++] == '-';
        if (!is_digit(p)) return jfail(p, "bad number");
        while (is_digit(p)) {
            if (exp10 < 1000000000000000LL) exp10 = exp10 * 10 + (p->src[p->pos] - '0'); /* saturates */
            p->pos++;
        }
        if (eneg) exp10 = -exp10;
        is_float = 1;
    }
    if (is_float) {
        if (float_overflows(p->src + istart, ilen, p->src + fstart, flen, exp10))
            return jfail(p, "number outside the range of a binary64 double");
        return new_node(p, J_FLOAT);
    } else {
        uint64_t mag = 0;
        size_t i;
        if (ilen > MAX_INT_DIGITS) return jfail(p, "integer of more than 20 digits");
        for (i = 0; i < ilen; i++) {
            unsigned d = (unsigned)(p->src[istart + i] - '0');
            if (mag > (UINT64_MAX - d) / 10) return jfail(p, "integer outside [-2^63, 2^64)");
            mag = mag * 10 + d;
        }
        if (neg && mag > ((uint64_t)1 << 63)) return jfail(p, "integer outside [-2^63, 2^64)");
        idx = new_node(p, J_INT);
        if (idx == NONE) return NONE;
        p->nodes[idx].neg = (unsigned char)neg;
        p->nodes[idx].mag = mag;
        return idx;
    }
}

typedef struct keyref {
    const char *s;
    size_t n;
} keyref;

static int keyref_cmp(const void *a, const void *b) {
    const keyref *x = (const keyref *)a, *y = (const keyref *)b;
    size_t n = x->n < y->n ? x->n : y->n;
    int c = n ? memcmp(x->s, y->s, n) : 0;
    if (c) return c;
    return x->n < y->n ? -1 : x->n > y->n;
}

static size_t parse_value(jparser *p, int depth, int keep);

/* An object or an array at p->pos. keep: how many levels of descendants get nodes (-1: all). Below that
 * the values are parsed and checked just the same (syntax, limits, duplicate keys) but their nodes are
 * dropped as soon as they are parsed, so a large metadata.conversion costs no memory beyond the text.
 * An array keeps nodes for its first 8 elements only (its count stays exact). So the parsed header takes
 * at most about 15 bytes per byte of header text (objects of one-letter keys), N <= 64 MiB. */
static size_t parse_container(jparser *p, int depth, int is_object, int keep) {
    size_t idx, last = NONE, count = 0, nkeys = 0, cap = 0, i;
    keyref *keys = NULL;
    const char close = is_object ? '}' : ']';
    if (depth > MAX_DEPTH) return jfail(p, "arrays and objects nested more than 64 deep");
    idx = new_node(p, is_object ? J_OBJ : J_ARR);
    if (idx == NONE) return NONE;
    p->pos++;
    skip_ws(p);
    if (p->pos < p->len && p->src[p->pos] == close) {
        p->pos++;
        return idx;
    }
    for (;;) {
        size_t koff = 0, klen = 0, child;
        int child_keep = keep < 0 ? -1 : keep > 0 ? keep - 1 : 0;
        skip_ws(p);
        if (is_object) {
            if (p->pos >= p->len || p->src[p->pos] != '"') {
                free(keys);
                return jfail(p, "expected a string key");
            }
            if (!parse_string(p, &koff, &klen)) {
                free(keys);
                return NONE;
            }
            if (nkeys == cap) { /* every key, for the duplicate check */
                keyref *grown;
                cap = cap ? cap * 2 : 8;
                grown = cap < ((size_t)-1) / sizeof(keyref) ? (keyref *)realloc(keys, cap * sizeof(keyref)) : NULL;
                if (!grown) {
                    free(keys);
                    return joom(p);
                }
                keys = grown;
            }
            keys[nkeys].s = p->pool + koff;
            keys[nkeys++].n = klen;
            skip_ws(p);
            if (p->pos >= p->len || p->src[p->pos] != ':') {
                free(keys);
                return jfail(p, "expected ':'");
            }
            p->pos++;
            if (depth == 1 && klen == 8 && memcmp(p->pool + koff, "metadata", 8) == 0)
                child_keep = 1; /* metadata and its members' types; nothing below them is needed */
        }
        child = parse_value(p, depth + 1, child_keep);
        if (child == NONE) {
            free(keys);
            return NONE;
        }
        if (keep == 0) {
            p->n = idx + 1; /* drop the child's nodes */
        } else if (!is_object && count >= 8) {
            p->n = child; /* an array's elements past 8 are never looked at (a shape has at most 8) */
        } else {
            p->nodes[child].k = koff;
            p->nodes[child].klen = klen;
            if (last == NONE) p->nodes[idx].first = child;
            else p->nodes[last].next = child;
            last = child;
        }
        count++;
        skip_ws(p);
        if (p->pos < p->len && p->src[p->pos] == ',') {
            p->pos++;
            continue;
        }
        if (p->pos < p->len && p->src[p->pos] == close) {
            p->pos++;
            break;
        }
        free(keys);
        return jfail(p, is_object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
    p->nodes[idx].count = count;
    if (nkeys > 1) { /* duplicate keys (after unescaping): sort and compare neighbours */
        qsort(keys, nkeys, sizeof(keyref), keyref_cmp);
        for (i = 1; i < nkeys; i++)
            if (keyref_cmp(&keys[i - 1], &keys[i]) == 0) {
                free(keys);
                return jfail(p, "duplicate key in an object");
            }
    }
    free(keys);
    return idx;
}

static size_t parse_literal(jparser *p, const char *word, unsigned char type) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->src + p->pos, word, n) != 0) return jfail(p, "invalid literal");
    p->pos += n;
    return new_node(p, type);
}

static size_t parse_value(jparser *p, int depth, int keep) {
    unsigned char c;
    skip_ws(p);
    if (p->pos >= p->len) return jfail(p, "unexpected end of the header");
    c = p->src[p->pos];
    if (c == '{') return parse_container(p, depth, 1, keep);
    if (c == '[') return parse_container(p, depth, 0, keep);
    if (c == '"') {
        size_t off, len, idx;
        if (!parse_string(p, &off, &len)) return NONE;
        idx = new_node(p, J_STR);
        if (idx == NONE) return NONE;
        p->nodes[idx].s = off;
        p->nodes[idx].slen = len;
        return idx;
    }
    if (c == 't') return parse_literal(p, "true", J_TRUE);
    if (c == 'f') return parse_literal(p, "false", J_FALSE);
    if (c == 'n') return parse_literal(p, "null", J_NULL);
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(p);
    return jfail(p, "unexpected character (not JSON)");
}

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF). Returns the offset of the first
 * bad byte, or n. */
static size_t utf8_check(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t len, k;
        unsigned lo = 0x80, hi = 0xbf;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) len = 2;
        else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            if (c == 0xe0) lo = 0xa0;
            if (c == 0xed) hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            if (c == 0xf0) lo = 0x90;
            if (c == 0xf4) hi = 0x8f;
        } else return i;
        if (n - i < len) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (k = 2; k < len; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xbf) return i;
        i += len;
    }
    return n;
}

/* ---------------------------------------------------------------------------------- the reader */

typedef struct section {
    uint64_t offset, length, count; /* count: elements (the product of dims) */
    uint64_t dims[8];
    unsigned ndim;
    const char *name; /* its key in the header: the section's (or the embedded file's) name */
    size_t name_len;
    uint32_t crc;
    claq_dtype dtype;
} section;

typedef struct tensor {
    const char *name;
    size_t name_len;
    claq_kind kind;
    unsigned ndim;
    uint64_t shape[8];
    size_t sec_first, sec_count;
    /* indices into the section table, NONE when absent */
    size_t data, bw, grid, cb, rice, codes[9], huff[9], oc, orow, oval; /* huff[b]: huffman_<b> (version 4) */
    int checked;
} tensor;

typedef struct embedded {
    const char *name;
    size_t name_len;
    int zlib;
    uint64_t size;
    size_t sec;
    int crc_checked;
} embedded;

typedef struct placed {
    uint64_t offset;
    size_t index;
} placed;

struct claq_reader {
    const unsigned char *buf;
    uint64_t size;
    unsigned char *owned;
    unsigned version;
    const unsigned char *data; /* the data region */
    uint64_t data_size;
    size_t json_len;
    jparser json;
    section *secs;
    size_t nsecs, secs_cap;
    placed *order; /* sections by offset */
    tensor *tensors;
    size_t ntensors;
    embedded *files;
    size_t nfiles;
};

static void free_reader(claq_reader *r) {
    if (!r) return;
    free(r->json.nodes);
    free(r->json.pool);
    free(r->secs);
    free(r->order);
    free(r->tensors);
    free(r->files);
    free(r->owned);
    free(r);
}

void claq_close(claq_reader *reader) { free_reader(reader); }

#define NODE(r, i) (&(r)->json.nodes[(i)])
#define KEY(r, i) ((r)->json.pool + NODE(r, i)->k)
#define STR(r, i) ((r)->json.pool + NODE(r, i)->s)

static size_t obj_get(const claq_reader *r, size_t obj, const char *key) {
    size_t c, n = strlen(key);
    for (c = NODE(r, obj)->first; c != NONE; c = NODE(r, c)->next)
        if (NODE(r, c)->klen == n && memcmp(KEY(r, c), key, n) == 0) return c;
    return NONE;
}

/* 1 when obj's keys are exactly `keys` (keys are unique already); else 0 and a message in msg. */
static int keys_exactly(const claq_reader *r, size_t obj, const char *const *keys, size_t nkeys, char *msg,
                        size_t cap) {
    size_t c, i;
    char q[80];
    for (i = 0; i < nkeys; i++)
        if (obj_get(r, obj, keys[i]) == NONE) {
            snprintf(msg, cap, "missing key \"%s\"", keys[i]);
            return 0;
        }
    for (c = NODE(r, obj)->first; c != NONE; c = NODE(r, c)->next) {
        int known = 0;
        for (i = 0; i < nkeys && !known; i++)
            known = NODE(r, c)->klen == strlen(keys[i]) && memcmp(KEY(r, c), keys[i], NODE(r, c)->klen) == 0;
        if (!known) {
            snprintf(msg, cap, "unexpected key %s", quote(q, sizeof q, KEY(r, c), NODE(r, c)->klen));
            return 0;
        }
    }
    return 1;
}

static int str_is(const claq_reader *r, size_t node, const char *s) {
    return node != NONE && NODE(r, node)->type == J_STR && NODE(r, node)->slen == strlen(s) &&
           memcmp(STR(r, node), s, NODE(r, node)->slen) == 0;
}

/* A non-negative JSON integer (true/false and floats such as 2.0 are not integers). */
static int get_uint(const claq_reader *r, size_t node, uint64_t *v) {
    const jnode *nd = NODE(r, node);
    if (nd->type != J_INT || (nd->neg && nd->mag != 0)) return 0;
    *v = nd->mag;
    return 1;
}

static claq_status add_section(claq_reader *r, const section *s, size_t *index, claq_error *err) {
    if (r->nsecs == r->secs_cap) {
        size_t cap = r->secs_cap ? r->secs_cap * 2 : 16;
        section *grown;
        if (cap > ((size_t)-1) / sizeof(section)) return fail(err, CLAQ_OUT_OF_MEMORY, "out of memory");
        grown = (section *)realloc(r->secs, cap * sizeof(section));
        if (!grown) return fail(err, CLAQ_OUT_OF_MEMORY, "out of memory");
        r->secs = grown;
        r->secs_cap = cap;
    }
    r->secs[r->nsecs] = *s;
    *index = r->nsecs++;
    return CLAQ_OK;
}

static const char *const ENTRY_KEYS[] = {"dtype", "shape", "offset", "length", "crc32", "encoding", "size"};

/* One section entry (section 2), the checks every entry gets, in this order: the key set, dtype, shape (a list
 * of at most 8 non-negative integers), offset, length (> 0), crc32 (all: BadHeader), then the offset's alignment
 * (BadLayout), then length = product of shape * dtype size (BadHeader). What depends on where the entry is
 * (a raw tensor's "data", a quantized weight's sections, an embedded file) is checked by the caller after
 * all of a tensor's entries. The spec's section 7.3 gives this order (it once gave none: README.md,
 * "Ambiguities"). with_file_keys: a version-2 (3, 4) embedded file (two keys more). */
static claq_status check_entry(claq_reader *r, size_t node, const char *where, int with_file_keys, size_t *index,
                               claq_error *err) {
    char msg[160];
    size_t c, shape, i;
    section s;
    uint64_t v, bytes;
    int overflow = 0;
    memset(&s, 0, sizeof s);
    s.name = KEY(r, node);
    s.name_len = NODE(r, node)->klen;
    if (NODE(r, node)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: %s: entry is not an object", where);
    if (!keys_exactly(r, node, ENTRY_KEYS, with_file_keys ? 7 : 5, msg, sizeof msg))
        return fail(err, CLAQ_BAD_HEADER, "header: %s: %s", where, msg);
    c = obj_get(r, node, "dtype");
    for (i = 0; i < N_DTYPES; i++)
        if (str_is(r, c, DTYPES[i].name)) break;
    if (i == N_DTYPES) return fail(err, CLAQ_BAD_HEADER, "header: %s: dtype is not one of the eleven", where);
    s.dtype = (claq_dtype)i;
    shape = obj_get(r, node, "shape");
    if (NODE(r, shape)->type != J_ARR || NODE(r, shape)->count > 8)
        return fail(err, CLAQ_BAD_HEADER, "header: %s: shape is not a list of at most 8 integers", where);
    s.ndim = (unsigned)NODE(r, shape)->count;
    s.count = 1;
    for (i = 0, c = NODE(r, shape)->first; c != NONE; c = NODE(r, c)->next, i++) {
        if (!get_uint(r, c, &s.dims[i]))
            return fail(err, CLAQ_BAD_HEADER, "header: %s: shape holds something not a non-negative integer", where);
        if (!mul_u64(s.count, s.dims[i], &s.count)) overflow = 1;
    }
    if (!get_uint(r, obj_get(r, node, "offset"), &s.offset))
        return fail(err, CLAQ_BAD_HEADER, "header: %s: offset is not a non-negative integer", where);
    if (!get_uint(r, obj_get(r, node, "length"), &s.length) || s.length == 0)
        return fail(err, CLAQ_BAD_HEADER, "header: %s: length is not a positive integer", where);
    if (!get_uint(r, obj_get(r, node, "crc32"), &v) || v > 0xffffffffu)
        return fail(err, CLAQ_BAD_HEADER, "header: %s: crc32 is not an integer in [0, 2^32)", where);
    s.crc = (uint32_t)v;
    if (s.offset % ALIGNMENT != 0)
        return fail(err, CLAQ_BAD_LAYOUT, "%s: offset %llu is not a multiple of 64", where, (unsigned long long)s.offset);
    if (overflow || !mul_u64(s.count, DTYPES[s.dtype].size, &bytes) || bytes != s.length)
        return fail(err, CLAQ_BAD_HEADER, "header: %s: length %llu is not the shape's product times %u",
                    where, (unsigned long long)s.length, DTYPES[s.dtype].size);
    return add_section(r, &s, index, err);
}

/* Code points that are not "printable text" in an embedded file's name (section 2 does not define the word):
 * C0/C1 controls and DEL (Cc), format characters (Cf), private use (Co), separators other than the space
 * (Zs, Zl, Zp), as of Unicode 14.0 (Python 3.11's str.isprintable without its unassigned code points, Cn,
 * which change with every Unicode version; README.md, "Ambiguities"). Surrogates cannot occur in UTF-8. */
static const uint32_t NOT_PRINTABLE[][2] = {
    {0x0000, 0x001f}, {0x007f, 0x00a0}, {0x00ad, 0x00ad}, {0x0600, 0x0605}, {0x061c, 0x061c}, {0x06dd, 0x06dd},
    {0x070f, 0x070f}, {0x0890, 0x0891}, {0x08e2, 0x08e2}, {0x1680, 0x1680}, {0x180e, 0x180e}, {0x2000, 0x200f},
    {0x2028, 0x202f}, {0x205f, 0x2064}, {0x2066, 0x206f}, {0x3000, 0x3000}, {0xd800, 0xf8ff}, {0xfeff, 0xfeff},
    {0xfff9, 0xfffb}, {0x110bd, 0x110bd}, {0x110cd, 0x110cd}, {0x13430, 0x13438}, {0x1bca0, 0x1bca3},
    {0x1d173, 0x1d17a}, {0xe0001, 0xe0001}, {0xe0020, 0xe007f}, {0xf0000, 0xffffd}, {0x100000, 0x10fffd}};

/* Section 2: 1 to 255 bytes of printable text, no '/' or '\', not "." or "..". s is valid UTF-8 (it was
 * checked with the header; JSON escapes decode to valid UTF-8 too). */
static int file_name_ok(const char *s, size_t n) {
    size_t i = 0, k;
    if (n < 1 || n > 255) return 0;
    if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.')) return 0;
    while (i < n) {
        const unsigned char c = (unsigned char)s[i];
        uint32_t cp;
        size_t len = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
        if (len > n - i) return 0;
        cp = len == 1 ? c : len == 2 ? (c & 0x1fu) : len == 3 ? (c & 0x0fu) : (c & 0x07u);
        for (k = 1; k < len; k++) cp = (cp << 6) | ((unsigned char)s[i + k] & 0x3fu);
        if (cp == '/' || cp == '\\') return 0;
        for (k = 0; k < sizeof NOT_PRINTABLE / sizeof NOT_PRINTABLE[0]; k++)
            if (cp >= NOT_PRINTABLE[k][0] && cp <= NOT_PRINTABLE[k][1]) return 0;
        i += len;
    }
    return 1;
}

enum { S_BW, S_GRID, S_CB, S_RICE, S_CODES, S_HUFF, S_OC, S_OROW, S_OVAL, S_UNKNOWN };

static int classify_section(const char *s, size_t n, unsigned max_width, unsigned version, unsigned *width) {
#define IS(lit) (n == sizeof(lit) - 1 && memcmp(s, lit, n) == 0)
    if (IS("bit_widths")) return S_BW;
    if (IS("codebook_grid")) return version >= 2 ? S_GRID : S_UNKNOWN;
    if (IS("codebooks")) return S_CB;
    if (IS("codebook_rice")) return version >= 3 ? S_RICE : S_UNKNOWN;
    if (IS("outlier_counts")) return S_OC;
    if (IS("outlier_rows")) return S_OROW;
    if (IS("outlier_values")) return S_OVAL;
    if (n == 7 && memcmp(s, "codes_", 6) == 0 && s[6] >= '1' && (unsigned)(s[6] - '0') <= max_width) {
        *width = (unsigned)(s[6] - '0');
        return S_CODES;
    }
    if (version >= 4 && n == 9 && memcmp(s, "huffman_", 8) == 0 && s[8] >= '1' && s[8] <= '8') {
        *width = (unsigned)(s[8] - '0');
        return S_HUFF;
    }
    return S_UNKNOWN;
#undef IS
}

/* A tensor (sections 2, 4, 5): its keys, kind and shape; every section entry (check_entry); then what its
 * kind asks of its sections. What needs the data (codebook count, code stream lengths, the outlier
 * sections' sizes) is step 5 (check_claq_contents). */
static claq_status check_tensor_header(claq_reader *r, size_t node, tensor *t, claq_error *err) {
    static const char *const TENSOR_KEYS[] = {"kind", "shape", "sections"};
    char msg[160], where[200], qn[80], qs[64];
    size_t kind, shape, secs, c, i;
    claq_status st;
    unsigned max_width = r->version == 1 ? 4 : 8, b;
    t->name = KEY(r, node);
    t->name_len = NODE(r, node)->klen;
    t->data = t->bw = t->grid = t->cb = t->rice = t->oc = t->orow = t->oval = NONE;
    for (b = 0; b < 9; b++) t->codes[b] = t->huff[b] = NONE;
    quote(qn, sizeof qn, t->name, t->name_len);
    if (NODE(r, node)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: tensor %s is not an object", qn);
    if (!keys_exactly(r, node, TENSOR_KEYS, 3, msg, sizeof msg))
        return fail(err, CLAQ_BAD_HEADER, "header: tensor %s: %s", qn, msg);
    kind = obj_get(r, node, "kind");
    if (str_is(r, kind, "raw")) t->kind = CLAQ_KIND_RAW;
    else if (str_is(r, kind, "claq")) t->kind = CLAQ_KIND_CLAQ;
    else return fail(err, CLAQ_BAD_HEADER, "header: tensor %s: kind is not \"raw\" or \"claq\"", qn);
    shape = obj_get(r, node, "shape");
    if (NODE(r, shape)->type != J_ARR || NODE(r, shape)->count < 1 || NODE(r, shape)->count > 8)
        return fail(err, CLAQ_BAD_HEADER, "header: tensor %s: shape is not a list of 1 to 8 integers", qn);
    t->ndim = (unsigned)NODE(r, shape)->count;
    for (i = 0, c = NODE(r, shape)->first; c != NONE; c = NODE(r, c)->next, i++)
        if (!get_uint(r, c, &t->shape[i]) || t->shape[i] == 0)
            return fail(err, CLAQ_BAD_HEADER, "header: tensor %s: shape holds a non-positive or non-integer", qn);
    secs = obj_get(r, node, "sections");
    if (NODE(r, secs)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: tensor %s: sections is not an object", qn);
    t->sec_first = r->nsecs;
    for (c = NODE(r, secs)->first; c != NONE; c = NODE(r, c)->next) {
        size_t idx;
        snprintf(where, sizeof where, "tensor %s section %s", qn, quote(qs, sizeof qs, KEY(r, c), NODE(r, c)->klen));
        st = check_entry(r, c, where, 0, &idx, err);
        if (st) return st;
    }
    t->sec_count = r->nsecs - t->sec_first;
    if (t->kind == CLAQ_KIND_RAW) { /* section 4 */
        const section *s = &r->secs[t->sec_first];
        c = NODE(r, secs)->first;
        if (t->sec_count != 1 || NODE(r, c)->klen != 4 || memcmp(KEY(r, c), "data", 4) != 0)
            return fail(err, CLAQ_BAD_HEADER, "header: raw tensor %s: sections are not exactly \"data\"", qn);
        if (s->ndim != t->ndim || memcmp(s->dims, t->shape, t->ndim * sizeof(uint64_t)) != 0)
            return fail(err, CLAQ_BAD_HEADER, "header: raw tensor %s: data's shape differs from the tensor's", qn);
        t->data = t->sec_first;
        return CLAQ_OK;
    }
    /* kind claq (section 5): [out, in], known section names, each [n] */
    if (t->ndim != 2) return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: shape is not [out, in]", qn);
    for (i = 0, c = NODE(r, secs)->first; c != NONE; c = NODE(r, c)->next, i++) {
        const size_t idx = t->sec_first + i;
        int which = classify_section(KEY(r, c), NODE(r, c)->klen, max_width, r->version, &b);
        quote(qs, sizeof qs, KEY(r, c), NODE(r, c)->klen);
        if (which == S_UNKNOWN)
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: unknown section %s (version %u)", qn, qs,
                        r->version);
        if (r->secs[idx].ndim != 1)
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: section %s's shape is not [n]", qn, qs);
        switch (which) {
        case S_BW: t->bw = idx; break;
        case S_GRID: t->grid = idx; break;
        case S_CB: t->cb = idx; break;
        case S_RICE: t->rice = idx; break;
        case S_CODES: t->codes[b] = idx; break;
        case S_HUFF: t->huff[b] = idx; break;
        case S_OC: t->oc = idx; break;
        case S_OROW: t->orow = idx; break;
        default: t->oval = idx; break;
        }
    }
    {
        const uint64_t out = t->shape[0], in = t->shape[1];
        uint64_t two_in;
        if (t->bw == NONE) return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: no bit_widths section", qn);
        if (r->secs[t->bw].dtype != CLAQ_U8 || r->secs[t->bw].count != in)
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: bit_widths is not U8 [in]", qn);
        if (t->cb == NONE && t->rice == NONE)
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: no codebooks section", qn);
        if (t->cb != NONE && t->rice != NONE)
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: codebooks and codebook_rice both present", qn);
        for (b = 1; b <= 8; b++) /* CLAQ-H35, right after H34: the least such width */
            if (t->codes[b] != NONE && t->huff[b] != NONE)
                return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: codes_%u and huffman_%u both present "
                            "(CLAQ-H35)", qn, b, b);
        if (t->cb != NONE && r->secs[t->cb].dtype != CLAQ_F16 && !(r->version >= 2 && r->secs[t->cb].dtype == CLAQ_U8))
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: codebooks is not %s", qn,
                        r->version >= 2 ? "F16 or U8" : "F16 (U8 codebooks need version 2)");
        if (t->rice != NONE && r->secs[t->rice].dtype != CLAQ_U8)
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: codebook_rice is not U8", qn);
        if ((t->grid != NONE) != (t->rice != NONE || r->secs[t->cb].dtype == CLAQ_U8))
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: codebook_grid is %s", qn,
                        t->grid == NONE ? "missing (codebooks are u8 levels)" : "present but codebooks are F16");
        if (t->grid != NONE &&
            (r->secs[t->grid].dtype != CLAQ_F16 || !mul_u64(in, 2, &two_in) || r->secs[t->grid].count != two_in))
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: codebook_grid is not F16 [2 * in]", qn);
        for (b = 1; b <= 8; b++)
            if (t->codes[b] != NONE && r->secs[t->codes[b]].dtype != CLAQ_U32)
                return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: codes_%u is not U32", qn, b);
        for (b = 1; b <= 8; b++)
            if (t->huff[b] != NONE && r->secs[t->huff[b]].dtype != CLAQ_U8)
                return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: huffman_%u is not U8", qn, b);
        if ((t->oc != NONE) != (t->orow != NONE) || (t->oc != NONE) != (t->oval != NONE))
            return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: the outlier sections are not all present or all absent", qn);
        if (t->oc != NONE) { /* their sizes (counts [in], rows and values [sum of counts]) are step 5's */
            if (r->secs[t->oc].dtype != CLAQ_U8 && r->secs[t->oc].dtype != CLAQ_U16)
                return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: outlier_counts is not U8 or U16", qn);
            if (!(r->secs[t->orow].dtype == CLAQ_U32 || (r->secs[t->orow].dtype == CLAQ_U16 && out <= 65536)))
                return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: outlier_rows is not U32 (or U16 with out <= 65536)", qn);
            if (r->secs[t->oval].dtype != CLAQ_F16)
                return fail(err, CLAQ_BAD_HEADER, "header: claq tensor %s: outlier_values is not F16", qn);
        }
    }
    return CLAQ_OK;
}

/* An embedded file (section 2): its name, its entry (check_entry), then dtype U8 and shape [n]; version 2:
 * encoding and size. */
static claq_status check_file_header(claq_reader *r, size_t node, embedded *f, claq_error *err) {
    char where[200], qn[80];
    size_t enc;
    uint64_t size;
    claq_status st;
    const section *s;
    f->name = KEY(r, node);
    f->name_len = NODE(r, node)->klen;
    quote(qn, sizeof qn, f->name, f->name_len);
    if (!file_name_ok(f->name, f->name_len))
        return fail(err, CLAQ_BAD_HEADER, "header: embedded file name %s is not a plain file name", qn);
    snprintf(where, sizeof where, "file %s", qn);
    st = check_entry(r, node, where, r->version >= 2, &f->sec, err);
    if (st) return st;
    s = &r->secs[f->sec];
    if (s->dtype != CLAQ_U8 || s->ndim != 1)
        return fail(err, CLAQ_BAD_HEADER, "header: file %s: not a U8 section of shape [n]", qn);
    f->size = s->length;
    if (r->version < 2) return CLAQ_OK; /* version 1: the bytes as they are */
    enc = obj_get(r, node, "encoding");
    if (str_is(r, enc, "none")) f->zlib = 0;
    else if (str_is(r, enc, "zlib")) f->zlib = 1;
    else return fail(err, CLAQ_BAD_HEADER, "header: file %s: encoding is not \"none\" or \"zlib\"", qn);
    if (!get_uint(r, obj_get(r, node, "size"), &size) || size < 1 || size > MAX_EMBEDDED_SIZE)
        return fail(err, CLAQ_BAD_HEADER, "header: file %s: size is not an integer in [1, 2^28]", qn);
    if (!f->zlib && size != s->length)
        return fail(err, CLAQ_BAD_HEADER, "header: file %s: encoding none but size %llu != length %llu", qn,
                    (unsigned long long)size, (unsigned long long)s->length);
    f->size = size;
    return CLAQ_OK;
}

static claq_status check_header(claq_reader *r, const unsigned char *text, size_t n, claq_error *err) {
    static const char *const TOP_KEYS[] = {"format", "version", "metadata", "tensors", "files"};
    jparser *p = &r->json;
    size_t bad, root, meta, c, tensors, files, i;
    uint64_t v;
    char msg[160];
    claq_status st;
    bad = utf8_check(text, n);
    if (bad != n) return fail(err, CLAQ_BAD_HEADER, "header: not UTF-8 (byte %lu)", (unsigned long)bad);
    if (n == 0 || text[0] != '{') return fail(err, CLAQ_BAD_HEADER, "header: does not start with '{'");
    p->src = text;
    p->len = n;
    p->pool_cap = n + 1;
    p->pool = (char *)malloc(p->pool_cap);
    if (!p->pool) return fail(err, CLAQ_OUT_OF_MEMORY, "out of memory for the header");
    root = parse_value(p, 1, -1);
    if (root != NONE) {
        r->json_len = p->pos;
        skip_ws(p); /* the JSON text's own trailing whitespace, then the padding (spaces) */
        if (p->pos != n) root = jfail(p, "more after the JSON object (padding must be spaces)");
    }
    if (root == NONE) return fail(err, p->status, "%s", p->msg);
    /* the schema (section 2) */
    if (NODE(r, root)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: not a JSON object");
    if (!keys_exactly(r, root, TOP_KEYS, 5, msg, sizeof msg))
        return fail(err, CLAQ_BAD_HEADER, "header: top level: %s", msg);
    if (!str_is(r, obj_get(r, root, "format"), "claq"))
        return fail(err, CLAQ_BAD_HEADER, "header: format is not \"claq\"");
    if (!get_uint(r, obj_get(r, root, "version"), &v) || v != r->version)
        return fail(err, CLAQ_BAD_HEADER, "header: version is not the preamble's (%u)", r->version);
    meta = obj_get(r, root, "metadata");
    if (NODE(r, meta)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: metadata is not an object");
    c = obj_get(r, meta, "config");
    if (c != NONE && NODE(r, c)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: metadata.config is not an object");
    c = obj_get(r, meta, "generation_config");
    if (c != NONE && NODE(r, c)->type != J_OBJ && NODE(r, c)->type != J_NULL)
        return fail(err, CLAQ_BAD_HEADER, "header: metadata.generation_config is not an object or null");
    c = obj_get(r, meta, "conversion");
    if (c != NONE && NODE(r, c)->type != J_OBJ)
        return fail(err, CLAQ_BAD_HEADER, "header: metadata.conversion is not an object");
    tensors = obj_get(r, root, "tensors");
    files = obj_get(r, root, "files");
    if (NODE(r, tensors)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: tensors is not an object");
    if (NODE(r, files)->type != J_OBJ) return fail(err, CLAQ_BAD_HEADER, "header: files is not an object");
    r->ntensors = NODE(r, tensors)->count;
    r->nfiles = NODE(r, files)->count;
    /* counts are bounded by the number of JSON nodes, hence by N */
    r->tensors = (tensor *)calloc(r->ntensors ? r->ntensors : 1, sizeof(tensor));
    r->files = (embedded *)calloc(r->nfiles ? r->nfiles : 1, sizeof(embedded));
    if (!r->tensors || !r->files) return fail(err, CLAQ_OUT_OF_MEMORY, "out of memory for the tensor table");
    for (i = 0, c = NODE(r, tensors)->first; c != NONE; c = NODE(r, c)->next, i++) {
        st = check_tensor_header(r, c, &r->tensors[i], err);
        if (st) return st;
    }
    for (i = 0, c = NODE(r, files)->first; c != NONE; c = NODE(r, c)->next, i++) {
        st = check_file_header(r, c, &r->files[i], err);
        if (st) return st;
    }
    return CLAQ_OK;
}

static int placed_cmp(const void *a, const void *b) {
    const placed *x = (const placed *)a, *y = (const placed *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Section 3 (step 4), from the header alone. */
static claq_status check_placement(claq_reader *r, claq_error *err) {
    size_t i;
    uint64_t expected = 0;
    r->order = (placed *)malloc((r->nsecs ? r->nsecs : 1) * sizeof(placed));
    if (!r->order) return fail(err, CLAQ_OUT_OF_MEMORY, "out of memory for the section table");
    for (i = 0; i < r->nsecs; i++) {
        r->order[i].offset = r->secs[i].offset;
        r->order[i].index = i;
    }
    qsort(r->order, r->nsecs, sizeof(placed), placed_cmp);
    for (i = 0; i < r->nsecs; i++) {
        const section *s = &r->secs[r->order[i].index];
        uint64_t end;
        if (s->offset != expected)
            return fail(err, CLAQ_BAD_LAYOUT, "a section at offset %llu %s (the next one must start at %llu)",
                        (unsigned long long)s->offset, s->offset < expected ? "overlaps the one before it" : "leaves a hole",
                        (unsigned long long)expected);
        if (!add_u64(s->offset, s->length, &end) || !align_up(end, &expected))
            return fail(err, CLAQ_BAD_LAYOUT, "a section at offset %llu ends past 2^64", (unsigned long long)s->offset);
    }
    if (expected != r->data_size)
        return fail(err, CLAQ_BAD_LAYOUT, "the sections end at %llu (padded) but the data region has %llu bytes",
                    (unsigned long long)expected, (unsigned long long)r->data_size);
    return CLAQ_OK;
}

claq_status claq_open_memory(const void *data, size_t size, claq_reader **out, claq_error *err) {
    const unsigned char *buf = (const unsigned char *)data;
    uint32_t version;
    uint64_t n;
    claq_reader *r;
    claq_status st;
    if (!out) return fail(err, CLAQ_INVALID_ARGUMENT, "no place for the reader");
    *out = NULL;
    if (!buf && size) return fail(err, CLAQ_INVALID_ARGUMENT, "no buffer");
    if (size < 16)
        return fail(err, CLAQ_TRUNCATED_FILE, "the file has %lu bytes, fewer than the 16 of the preamble",
                    (unsigned long)size);
    if (memcmp(buf, "CLAQ", 4) != 0) return fail(err, CLAQ_BAD_MAGIC, "the magic is not CLAQ");
    version = rd32(buf + 4);
    if (version < 1 || version > 4)
        return fail(err, CLAQ_UNSUPPORTED_VERSION, "version %lu (this reader knows 1 to 4)", (unsigned long)version);
    n = rd64(buf + 8);
    if (n > MAX_HEADER)
        return fail(err, CLAQ_BAD_HEADER, "header length %llu exceeds 64 MiB", (unsigned long long)n);
    if (16 + n > (uint64_t)size)
        return fail(err, CLAQ_TRUNCATED_FILE, "the header (%llu bytes) runs past the end of the file (%llu bytes)",
                    (unsigned long long)n, (unsigned long long)size);
    if ((16 + n) % ALIGNMENT != 0)
        return fail(err, CLAQ_BAD_HEADER, "16 + header length (%llu) is not a multiple of 64", (unsigned long long)(16 + n));
    r = (claq_reader *)calloc(1, sizeof *r);
    if (!r) return fail(err, CLAQ_OUT_OF_MEMORY, "out of memory");
    r->buf = buf;
    r->size = size;
    r->version = version;
    r->data = buf + 16 + n;
    r->data_size = (uint64_t)size - 16 - n;
    st = check_header(r, buf + 16, (size_t)n, err);
    if (!st) st = check_placement(r, err);
    if (st) {
        free_reader(r);
        return st;
    }
    *out = r;
    return succeed(err);
}

claq_status claq_open_path(const char *path, claq_reader **out, claq_error *err) {
    FILE *fp;
    unsigned char *buf = NULL;
    size_t size = 0, cap = 0;
    claq_status st;
    if (!out) return fail(err, CLAQ_INVALID_ARGUMENT, "no place for the reader");
    *out = NULL;
    if (!path) return fail(err, CLAQ_INVALID_ARGUMENT, "no path");
    fp = fopen(path, "rb");
    if (!fp) return fail(err, CLAQ_IO_ERROR, "cannot open the file");
    for (;;) { /* read to the end in growing chunks (works for pipes; no trust in a size up front) */
        size_t got;
        if (size == cap) {
            size_t ncap = cap ? cap * 2 : 65536;
            unsigned char *grown;
            if (ncap < cap) {
                free(buf);
                fclose(fp);
                return fail(err, CLAQ_OUT_OF_MEMORY, "file too large");
            }
            grown = (unsigned char *)realloc(buf, ncap);
            if (!grown) {
                free(buf);
                fclose(fp);
                return fail(err, CLAQ_OUT_OF_MEMORY, "out of memory reading the file");
            }
            buf = grown;
            cap = ncap;
        }
        got = fread(buf + size, 1, cap - size, fp);
        size += got;
        if (got == 0) break;
    }
    if (ferror(fp)) {
        free(buf);
        fclose(fp);
        return fail(err, CLAQ_IO_ERROR, "error reading the file");
    }
    fclose(fp);
    st = claq_open_memory(buf, size, out, err);
    if (st) {
        free(buf);
        return st;
    }
    (*out)->owned = buf;
    return CLAQ_OK;
}

unsigned claq_version(const claq_reader *reader) { return reader ? reader->version : 0; }

const char *claq_header_json(const claq_reader *reader, size_t *length) {
    if (!reader) return NULL;
    if (length) *length = reader->json_len;
    return (const char *)reader->buf + 16;
}

size_t claq_tensor_count(const claq_reader *reader) { return reader ? reader->ntensors : 0; }
size_t claq_embedded_count(const claq_reader *reader) { return reader ? reader->nfiles : 0; }

claq_status claq_tensor_info_at(const claq_reader *reader, size_t index, claq_tensor_info *info) {
    const tensor *t;
    unsigned i;
    if (!reader || !info || index >= reader->ntensors) return CLAQ_INVALID_ARGUMENT;
    t = &reader->tensors[index];
    memset(info, 0, sizeof *info);
    info->name = t->name;
    info->name_len = t->name_len;
    info->kind = t->kind;
    info->ndim = t->ndim;
    info->count = 1;
    for (i = 0; i < t->ndim; i++) {
        info->shape[i] = t->shape[i];
        if (info->count != UINT64_MAX && !mul_u64(info->count, t->shape[i], &info->count)) info->count = UINT64_MAX;
    }
    info->dtype = t->kind == CLAQ_KIND_RAW ? reader->secs[t->data].dtype : CLAQ_F32;
    return CLAQ_OK;
}

claq_status claq_embedded_info_at(const claq_reader *reader, size_t index, claq_embedded_info *info) {
    const embedded *f;
    if (!reader || !info || index >= reader->nfiles) return CLAQ_INVALID_ARGUMENT;
    f = &reader->files[index];
    info->name = f->name;
    info->name_len = f->name_len;
    info->zlib = f->zlib;
    info->size = f->size;
    info->stored_length = reader->secs[f->sec].length;
    return CLAQ_OK;
}

long long claq_find_tensor(const claq_reader *reader, const char *name, size_t name_len) {
    size_t i;
    if (!reader || (!name && name_len)) return -1;
    for (i = 0; i < reader->ntensors; i++)
        if (reader->tensors[i].name_len == name_len && (name_len == 0 || memcmp(reader->tensors[i].name, name, name_len) == 0))
            return (long long)i;
    return -1;
}

long long claq_find_embedded(const claq_reader *reader, const char *name, size_t name_len) {
    size_t i;
    if (!reader || (!name && name_len)) return -1;
    for (i = 0; i < reader->nfiles; i++)
        if (reader->files[i].name_len == name_len && memcmp(reader->files[i].name, name, name_len) == 0)
            return (long long)i;
    return -1;
}

/* ----------------------------------------------------------------------------- step 5: tensors */

#define SEC_PTR(r, i) ((r)->data + (size_t)(r)->secs[(i)].offset)

static claq_status check_crc(claq_reader *r, size_t sec, const char *what, claq_error *err) {
    const section *s = &r->secs[sec];
    uint32_t crc = crc32_of(SEC_PTR(r, sec), s->length);
    if (crc != s->crc)
        return fail(err, CLAQ_CHECKSUM_MISMATCH, "%s: CRC-32 is %08lx, the header says %08lx", what,
                    (unsigned long)crc, (unsigned long)s->crc);
    return CLAQ_OK;
}

/* Coded levels (claq-v2.md section 5, "Coded levels"): a cursor over codebook_rice's table, low bits and
 * unary part. rice_open checks CLAQ-T13 to T17 (the unary part fully, so that rice_next never runs past
 * it); rice_next gives the next column's levels, 0 when one passes 254 (T18). No allocation. */
typedef struct rice_cursor {
    const unsigned char *table, *low, *unary;
    uint64_t low_bit, unary_bit, row_of_width[9];
} rice_cursor;

static claq_status rice_open(const claq_reader *r, const tensor *t, const uint64_t ncols[9], rice_cursor *c,
                             const char *qn, claq_error *err) {
    const section *s = &r->secs[t->rice];
    const unsigned char *p = SEC_PTR(r, t->rice);
    uint64_t rows = 0, gaps = 0, low_bits = 0, most = 0, low_bytes, unary_bytes, zeros = 0, z, i;
    unsigned b;
    for (b = 2; b <= 8; b++) {
        c->row_of_width[b] = rows;
        if (ncols[b]) rows += ((uint64_t)1 << b) - 2;
        gaps += ncols[b] * (((uint64_t)1 << b) - 2);
    }
    if (gaps == 0)
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook_rice but every column has 1 bit", qn);
    if (s->length < 2 * rows)
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook_rice is shorter than its %llu-byte table", qn,
                    (unsigned long long)(2 * rows));
    for (i = 0; i < rows; i++)
        if (p[2 * i + 1] > 7)
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook_rice table row %llu has k %u (at most 7)", qn,
                        (unsigned long long)i, p[2 * i + 1]);
    for (b = 2; b <= 8; b++) {
        const unsigned char *row = p + 2 * c->row_of_width[b];
        if (!ncols[b]) continue;
        for (i = 0; i + 2 < ((uint64_t)1 << b); i++) { /* each column of width b codes every row of it */
            const unsigned base = row[2 * i], k = row[2 * i + 1];
            low_bits += ncols[b] * k;
            most += ncols[b] * (1 + ((base < 253 ? 253 - base : 0) >> k));
        }
    }
    low_bytes = low_bits / 8 + (low_bits % 8 != 0);
    if (s->length - 2 * rows < low_bytes)
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook_rice ends inside its low bits", qn);
    if (low_bits % 8 && (p[2 * rows + low_bytes - 1] >> (low_bits % 8)) != 0)
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook_rice low bits have non-zero padding", qn);
    unary_bytes = s->length - 2 * rows - low_bytes;
    if (unary_bytes == 0 || unary_bytes > most / 8 + (most % 8 != 0))
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook_rice's unary part has %llu bytes, its gaps need "
                    "1 to %llu", qn, (unsigned long long)unary_bytes, (unsigned long long)(most / 8 + (most % 8 != 0)));
    c->table = p;
    c->low = p + 2 * rows;
    c->unary = c->low + low_bytes;
    c->low_bit = c->unary_bit = 0;
    for (z = 0; z < 8 * unary_bytes && zeros < gaps; z++) /* the gaps-th zero-bit */
        zeros += !((c->unary[z >> 3] >> (z & 7)) & 1u);
    if (zeros < gaps || (z - 1) / 8 != unary_bytes - 1 || ((z & 7) && (c->unary[z >> 3] >> (z & 7)) != 0))
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook_rice's unary part does not end with its last "
                    "gap's zero-bit and zero padding", qn);
    return CLAQ_OK;
}

static int rice_next(rice_cursor *c, unsigned b, unsigned char *levels) {
    const uint64_t n = (uint64_t)1 << b;
    const unsigned char *row = c->table + 2 * c->row_of_width[b];
    uint64_t level = 0, i;
    levels[0] = 0;
    levels[n - 1] = 255;
    for (i = 1; b >= 2 && i + 1 < n; i++) {
        const unsigned base = row[2 * (i - 1)], k = row[2 * (i - 1) + 1];
        uint64_t d = 0, q = 0;
        unsigned t;
        for (t = 0; t < k; t++, c->low_bit++)
            d |= (uint64_t)((c->low[c->low_bit >> 3] >> (c->low_bit & 7)) & 1u) << t;
        while ((c->unary[c->unary_bit >> 3] >> (c->unary_bit & 7)) & 1u) { /* rice_open saw the zero ahead */
            q++;
            c->unary_bit++;
        }
        c->unary_bit++;
        level += 1 + base + (d | q << k);
        if (level > 254) return 0;
        levels[i] = (unsigned char)level;
    }
    return 1;
}

/* Coded codes (claq-v2.md section 5, "Coded codes", version 4): section huffman_<b> stands for the stream
 * codes_<b>: K = ceil(n / 4096) u32 chunk offsets (part 1), 2^b codeword lengths (part 2), then the codewords
 * back to back, least significant bit first (part 3), a canonical prefix code of at most 12 bits a codeword.
 * huff_open checks CLAQ-T19 to T21 from the section's length, its lengths and its offsets, before any
 * codeword is read; huff_table builds the 4096-entry decode table of the lengths; huff_check decodes every
 * chunk (T22, T23). No allocation: the table is 8 KiB on the stack. Every read of part 3 is bounded by its
 * length (huff_window reads the bytes past its end as zero). */
#define CHUNK_CODES 4096u   /* codes between two chunk offsets */
#define MAX_CODEWORD_BITS 12u
#define HUFF_TABLE_SIZE (1u << MAX_CODEWORD_BITS)

typedef struct huff_view {
    const unsigned char *offsets, *lengths, *stream; /* parts 1, 2 and 3 */
    uint64_t n, chunks, stream_bytes, stream_bits;
    unsigned b;
} huff_view;

static claq_status huff_open(const claq_reader *r, size_t sec, unsigned b, uint64_t ncols, uint64_t out,
                             huff_view *h, const char *qn, claq_error *err) {
    const section *s = &r->secs[sec];
    const unsigned char *p = SEC_PTR(r, sec);
    const uint64_t symbols = (uint64_t)1 << b;
    uint64_t n = 0, chunks = 0, prefix = 0, least = UINT64_MAX, most = UINT64_MAX, kraft = 0, c, bits;
    unsigned longest = 0;
    if (mul_u64(ncols, out, &n)) { /* else no section can hold the codes: least stays 2^64 - 1 */
        chunks = n / CHUNK_CODES + (n % CHUNK_CODES != 0);
        prefix = 4 * chunks + symbols; /* chunks <= 2^52: no overflow */
        least = prefix + n / 8 + (n % 8 != 0);
        if (mul_u64(n, MAX_CODEWORD_BITS, &bits)) most = prefix + bits / 8 + (bits % 8 != 0);
    }
    if (s->length < least || s->length > most) /* CLAQ-T19 */
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: huffman_%u holds %llu bytes; its codes of 1 to 12 bits "
                    "with their chunk offsets and lengths take %llu to %llu (CLAQ-T19)", qn, b,
                    (unsigned long long)s->length, (unsigned long long)least, (unsigned long long)most);
    h->offsets = p;
    h->lengths = p + 4 * chunks;
    h->stream = p + prefix;
    h->n = n;
    h->chunks = chunks;
    h->stream_bytes = s->length - prefix;
    h->stream_bits = 8 * h->stream_bytes; /* the section lies in memory: far below 2^61 bytes */
    h->b = b;
    for (c = 0; c < symbols; c++) {
        const unsigned l = h->lengths[c];
        if (l > longest) longest = l;
        if (l > 0 && l <= MAX_CODEWORD_BITS) kraft += (uint64_t)1 << (MAX_CODEWORD_BITS - l);
    }
    if (longest == 0 || longest > MAX_CODEWORD_BITS) /* CLAQ-T20 */
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: huffman_%u's codeword lengths must be 0 to 12, one at "
                    "least above 0 (CLAQ-T20)", qn, b);
    if (kraft > HUFF_TABLE_SIZE)
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: huffman_%u's codeword lengths break Kraft's inequality "
                    "(CLAQ-T20)", qn, b);
    for (c = 0; c < chunks; c++) { /* CLAQ-T21 */
        const uint32_t at = rd32(h->offsets + 4 * c);
        if ((c == 0 && at != 0) || at > h->stream_bits)
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: huffman_%u's chunk offset %llu is %lu; the first must "
                        "be 0 and none past its %llu bits (CLAQ-T21)", qn, b, (unsigned long long)c,
                        (unsigned long)at, (unsigned long long)h->stream_bits);
    }
    return CLAQ_OK;
}

/* table[w] = (len << 8) | s for every 12-bit window w (the next 12 bits, least significant first) whose low
 * len bits are value s's codeword, bit-reversed (its first bit is the stream's first); 0 where the window
 * starts no codeword. The canonical code (section 5): the values with a length, by (length, value), take 0,
 * then each (previous + 1) << (its length - the previous length). The lengths passed CLAQ-T20. */
static void huff_table(const huff_view *h, uint16_t *table) {
    const unsigned symbols = 1u << h->b;
    unsigned l, s, code = 0, previous = 0, k;
    memset(table, 0, HUFF_TABLE_SIZE * sizeof *table);
    for (l = 1; l <= MAX_CODEWORD_BITS; l++)
        for (s = 0; s < symbols; s++) {
            unsigned reversed = 0;
            if (h->lengths[s] != l) continue;
            code = previous ? (code + 1) << (l - previous) : 0;
            previous = l;
            for (k = 0; k < l; k++) reversed |= ((code >> (l - 1 - k)) & 1u) << k;
            for (k = 0; k < (1u << (MAX_CODEWORD_BITS - l)); k++) /* reversed < 2^l: every index < 4096 */
                table[reversed | (k << l)] = (uint16_t)((l << 8) | s);
        }
}

/* The next 12 bits of part 3 from bit (< stream_bits), least significant first; bytes past the end read 0. */
static unsigned huff_window(const huff_view *h, uint64_t bit) {
    const uint64_t at = bit >> 3;
    uint32_t v = 0;
    unsigned k;
    for (k = 0; k < 3; k++)
        if (at + k < h->stream_bytes) v |= (uint32_t)h->stream[at + k] << (8 * k);
    return (unsigned)(v >> (bit & 7u)) & (HUFF_TABLE_SIZE - 1);
}

/* Decodes the code at *bit: its value, and *bit moved past its codeword; -1 (and *bit unchanged) where the bits
 * there start no codeword or it runs past the end of part 3 (CLAQ-T22). */
static int huff_next(const huff_view *h, const uint16_t *table, uint64_t *bit) {
    unsigned entry, l;
    if (*bit >= h->stream_bits) return -1;
    entry = table[huff_window(h, *bit)];
    l = entry >> 8;
    if (l == 0 || l > h->stream_bits - *bit) return -1;
    *bit += l;
    return (int)(entry & 0xffu);
}

/* CLAQ-T22 and T23, chunk by chunk: T22 for chunk c, then its end (T23), then chunk c + 1; after the last chunk,
 * the last byte and its padding bits (T23). */
static claq_status huff_check(const huff_view *h, const char *qn, claq_error *err) {
    uint16_t table[HUFF_TABLE_SIZE];
    uint64_t c, e, bit = 0;
    huff_table(h, table);
    for (c = 0; c < h->chunks; c++) {
        const uint64_t last = h->n - c * CHUNK_CODES < CHUNK_CODES ? h->n : (c + 1) * CHUNK_CODES;
        bit = rd32(h->offsets + 4 * c);
        for (e = c * CHUNK_CODES; e < last; e++)
            if (huff_next(h, table, &bit) < 0)
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: huffman_%u's chunk %llu meets, at bit %llu (code "
                            "%llu), bits that start no codeword or a codeword past the end (CLAQ-T22)", qn, h->b,
                            (unsigned long long)c, (unsigned long long)bit, (unsigned long long)e);
        if (c + 1 < h->chunks && bit != rd32(h->offsets + 4 * (c + 1)))
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: huffman_%u's chunk %llu ends at bit %llu, not where "
                        "chunk %llu starts (%lu) (CLAQ-T23)", qn, h->b, (unsigned long long)c, (unsigned long long)bit,
                        (unsigned long long)(c + 1), (unsigned long)rd32(h->offsets + 4 * (c + 1)));
    }
    /* bit >= 1 here (n >= 1 codes of 1 bit at least) and <= stream_bits */
    if ((bit - 1) / 8 != h->stream_bytes - 1 || ((bit & 7u) && (h->stream[bit >> 3] >> (bit & 7u)) != 0))
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: huffman_%u's codewords end at bit %llu: the section must "
                    "end with that byte, padded with zero bits (CLAQ-T23)", qn, h->b, (unsigned long long)bit);
    return CLAQ_OK;
}

/* Section 7: the contents of a quantized weight. The header already guarantees the sections' dtypes,
 * bit_widths [in] and codebook_grid [2 in]; placement guarantees every section lies inside the data region. */
static claq_status check_claq_contents(claq_reader *r, const tensor *t, const char *qn, claq_error *err) {
    const uint64_t out = t->shape[0], in = t->shape[1];
    const unsigned max_width = r->version == 1 ? 4 : 8;
    const unsigned char *bw = SEC_PTR(r, t->bw);
    const unsigned char *cbp = t->cb != NONE ? SEC_PTR(r, t->cb) : NULL;
    uint64_t ncols[9] = {0}, book = 0, j, e;
    unsigned char levels[256];
    rice_cursor rc;
    unsigned b;
    claq_status st;
    for (j = 0; j < in; j++) {
        b = bw[j];
        if (b < 1 || b > max_width)
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: column %llu has bit width %u (allowed 1..%u)", qn,
                        (unsigned long long)j, b, max_width);
        ncols[b]++;
        book += (uint64_t)1 << b; /* <= 256 * in: no overflow (in <= the file's size) */
    }
    if (t->rice != NONE) {
        st = rice_open(r, t, ncols, &rc, qn, err);
        if (st) return st;
        for (j = 0; j < in; j++)
            if (!rice_next(&rc, bw[j], levels))
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: column %llu's coded levels pass 254", qn,
                            (unsigned long long)j);
    } else if (book != r->secs[t->cb].count)
        return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebooks has %llu entries, the widths need %llu", qn,
                    (unsigned long long)r->secs[t->cb].count, (unsigned long long)book);
    if (t->grid != NONE) { /* CLAQ-T03 for every column, then T04 */
        const unsigned char *g = SEC_PTR(r, t->grid);
        for (j = 0; j < in; j++)
            if (!half_is_finite(rd16(g + 4 * j)) || !half_is_finite(rd16(g + 4 * j + 2)))
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: column %llu's grid is not finite", qn, (unsigned long long)j);
        for (j = 0; j < in; j++)
            if (!(half_to_float(rd16(g + 4 * j + 2)) >= 0.0f))
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: column %llu's grid step is negative", qn, (unsigned long long)j);
    }
    if (t->grid == NONE) { /* CLAQ-T05: every entry, used by a code or not */
        for (e = 0; e < book; e++)
            if (!half_is_finite(rd16(cbp + 2 * e)))
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook entry %llu is not finite", qn, (unsigned long long)e);
    } else {
        const unsigned char *g = SEC_PTR(r, t->grid);
        if (t->rice != NONE) rice_open(r, t, ncols, &rc, qn, NULL); /* a second walk, from the start */
        for (j = 0, e = 0; j < in; j++) {
            uint64_t m, n = (uint64_t)1 << bw[j];
            const unsigned char *lv = cbp ? cbp + e : levels;
            if (!cbp) rice_next(&rc, bw[j], levels);
            for (m = 0; m < n; m++, e++)
                if (!float_is_finite(grid_entry(rd16(g + 4 * j), rd16(g + 4 * j + 2), lv[m])))
                    return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codebook entry %llu is not finite", qn,
                                (unsigned long long)e);
        }
    }
    for (b = 1; b <= 8; b++) { /* CLAQ-T06, then T07 and T08 (codes_<b>) or T19 to T23 (huffman_<b>), width by width */
        uint64_t bits, words;
        const section *s;
        const int present = t->codes[b] != NONE || t->huff[b] != NONE; /* not both: CLAQ-H35 */
        if (present && !ncols[b])
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: %s_%u is present but no column has that width "
                        "(CLAQ-T06)", qn, t->huff[b] != NONE ? "huffman" : "codes", b);
        if (!present && ncols[b])
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codes_%u (or huffman_%u) is missing: a column has that "
                        "width (CLAQ-T06)", qn, b, b);
        if (!ncols[b]) continue;
        if (t->huff[b] != NONE) {
            huff_view h;
            st = huff_open(r, t->huff[b], b, ncols[b], out, &h, qn, err);
            if (!st) st = huff_check(&h, qn, err);
            if (st) return st;
            continue;
        }
        s = &r->secs[t->codes[b]];
        if (!mul_u64(ncols[b], out, &bits) || !mul_u64(bits, b, &bits))
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codes_%u would need more than 2^64 bits", qn, b);
        words = bits / 32 + (bits % 32 != 0);
        if (words != s->count)
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codes_%u has %llu words, needs %llu", qn, b,
                        (unsigned long long)s->count, (unsigned long long)words);
        if (bits % 32 != 0 && (rd32(SEC_PTR(r, t->codes[b]) + 4 * (words - 1)) >> (bits % 32)) != 0)
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: codes_%u has non-zero padding bits", qn, b);
    }
    if (t->oc != NONE) { /* CLAQ-T09, T10, T11, T12, each over all outliers before the next */
        const section *oc = &r->secs[t->oc], *orow = &r->secs[t->orow];
        const unsigned char *ocp = SEC_PTR(r, t->oc), *orp = SEC_PTR(r, t->orow), *ovp = SEC_PTR(r, t->oval);
        const int wide_counts = oc->dtype == CLAQ_U16, wide_rows = orow->dtype == CLAQ_U32;
        uint64_t total = 0, k = 0;
        if (oc->count != in || orow->count != r->secs[t->oval].count)
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: outlier counts (%llu for %llu columns), rows (%llu) and "
                        "values (%llu) disagree in size", qn, (unsigned long long)oc->count, (unsigned long long)in,
                        (unsigned long long)orow->count, (unsigned long long)r->secs[t->oval].count);
        for (j = 0; j < in; j++) total += wide_counts ? rd16(ocp + 2 * j) : ocp[j]; /* <= 65535 * in: no overflow */
        if (total != orow->count)
            return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: outlier counts sum to %llu, outlier_rows has %llu", qn,
                        (unsigned long long)total, (unsigned long long)orow->count);
        for (k = 0; k < total; k++) {
            uint64_t row = wide_rows ? rd32(orp + 4 * k) : rd16(orp + 2 * k);
            if (row >= out)
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: outlier row %llu (outlier %llu) out of range", qn,
                            (unsigned long long)row, (unsigned long long)k);
        }
        for (k = 0; k < total; k++)
            if (!half_is_finite(rd16(ovp + 2 * k)))
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: outlier value %llu is not finite", qn, (unsigned long long)k);
        for (j = 0, k = 0; j < in; j++) {
            uint64_t c = wide_counts ? rd16(ocp + 2 * j) : ocp[j], m, prev = 0;
            if (c > out)
                return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: column %llu has %llu outliers for %llu rows", qn,
                            (unsigned long long)j, (unsigned long long)c, (unsigned long long)out);
            for (m = 0; m < c; m++, k++) {
                uint64_t row = wide_rows ? rd32(orp + 4 * k) : rd16(orp + 2 * k);
                if (m > 0 && row <= prev)
                    return fail(err, CLAQ_BAD_TENSOR_DATA, "tensor %s: outlier rows of column %llu not strictly ascending",
                                qn, (unsigned long long)j);
                prev = row;
            }
        }
    }
    return CLAQ_OK;
}

claq_status claq_check_tensor(claq_reader *reader, size_t index, claq_error *err) {
    tensor *t;
    char qn[80], what[160];
    size_t i;
    claq_status st;
    if (!reader || index >= reader->ntensors) return fail(err, CLAQ_INVALID_ARGUMENT, "no tensor %lu", (unsigned long)index);
    t = &reader->tensors[index];
    if (t->checked) return succeed(err);
    quote(qn, sizeof qn, t->name, t->name_len);
    for (i = t->sec_first; i < t->sec_first + t->sec_count; i++) { /* CLAQ-C01, sections in header order */
        char qs[64];
        snprintf(what, sizeof what, "tensor %s section %s", qn,
                 quote(qs, sizeof qs, reader->secs[i].name, reader->secs[i].name_len));
        st = check_crc(reader, i, what, err);
        if (st) return st;
    }
    if (t->kind == CLAQ_KIND_CLAQ) { /* CLAQ-T01 onwards */
        st = check_claq_contents(reader, t, qn, err);
        if (st) return st;
    }
    t->checked = 1;
    return succeed(err);
}

static void decode_claq(const claq_reader *r, const tensor *t, float *dst) {
    const uint64_t out = t->shape[0], in = t->shape[1];
    const unsigned char *bw = SEC_PTR(r, t->bw), *cbp = t->cb != NONE ? SEC_PTR(r, t->cb) : NULL;
    const unsigned char *g = t->grid != NONE ? SEC_PTR(r, t->grid) : NULL;
    uint64_t kcol[9] = {0}, start = 0, j, i, ostart = 0;
    float book[256];
    unsigned char levels[256];
    rice_cursor rc;
    unsigned width;
    for (width = 1; width <= 8; width++) { /* coded codes first: each code's value, into its own place in dst */
        huff_view h;
        uint16_t table[HUFF_TABLE_SIZE];
        uint64_t bit = 0; /* checked: chunk 0 starts at bit 0 and every chunk where the one before it ends */
        uint64_t ncols = 0;
        if (t->huff[width] == NONE) continue;
        for (j = 0; j < in; j++) ncols += bw[j] == width;
        (void)huff_open(r, t->huff[width], width, ncols, out, &h, "", NULL); /* checked: succeeds */
        huff_table(&h, table);
        for (j = 0; j < in; j++)
            if (bw[j] == width)
                for (i = 0; i < out; i++) {
                    const int v = huff_next(&h, table, &bit); /* >= 0: checked (CLAQ-T22) */
                    dst[i * in + j] = (float)(v < 0 ? 0 : v);
                }
    }
    if (!cbp) { /* coded levels: checked already, walked again column by column */
        uint64_t ncols[9] = {0};
        for (j = 0; j < in; j++) ncols[bw[j]]++;
        rice_open(r, t, ncols, &rc, "", NULL);
    }
    for (j = 0; j < in; j++) {
        const unsigned b = bw[j];
        const uint32_t mask = (1u << b) - 1u;
        const unsigned char *words = t->codes[b] != NONE ? SEC_PTR(r, t->codes[b]) : NULL; /* NULL: coded */
        const uint64_t n = (uint64_t)1 << b, first = kcol[b]++ * out; /* code number of row 0 */
        uint64_t m;
        if (!cbp) rice_next(&rc, b, levels);
        for (m = 0; m < n; m++)
            book[m] = !cbp ? grid_entry(rd16(g + 4 * j), rd16(g + 4 * j + 2), levels[m])
                    : g ? grid_entry(rd16(g + 4 * j), rd16(g + 4 * j + 2), cbp[start + m])
                        : half_to_float(rd16(cbp + 2 * (start + m)));
        for (i = 0; i < out; i++) {
            const uint64_t bit = (first + i) * b, w = bit >> 5;
            const unsigned sh = (unsigned)(bit & 31u);
            uint64_t v;
            if (!words) { /* coded: the value decoded above */
                dst[i * in + j] = book[(unsigned)dst[i * in + j] & mask];
                continue;
            }
            v = rd32(words + 4 * w) >> sh;
            if (sh + b > 32) v |= (uint64_t)rd32(words + 4 * (w + 1)) << (32 - sh);
            dst[i * in + j] = book[v & mask];
        }
        start += n;
    }
    if (t->oc != NONE) {
        const unsigned char *ocp = SEC_PTR(r, t->oc), *orp = SEC_PTR(r, t->orow), *ovp = SEC_PTR(r, t->oval);
        const int wide_counts = r->secs[t->oc].dtype == CLAQ_U16, wide_rows = r->secs[t->orow].dtype == CLAQ_U32;
        for (j = 0; j < in; j++) {
            uint64_t c = wide_counts ? rd16(ocp + 2 * j) : ocp[j], m;
            for (m = 0; m < c; m++, ostart++) {
                uint64_t row = wide_rows ? rd32(orp + 4 * ostart) : rd16(orp + 2 * ostart);
                dst[row * in + j] = half_to_float(rd16(ovp + 2 * ostart));
            }
        }
    }
}

static int32_t to_i32(uint32_t u) { return u >= 0x80000000u ? -(int32_t)(~u) - 1 : (int32_t)u; }
static int64_t to_i64(uint64_t u) { return u >= ((uint64_t)1 << 63) ? -(int64_t)(~u) - 1 : (int64_t)u; }

static void decode_raw(const claq_reader *r, const tensor *t, float *dst) {
    const section *s = &r->secs[t->data];
    const unsigned char *p = SEC_PTR(r, t->data);
    uint64_t i;
    for (i = 0; i < s->count; i++) {
        float f;
        switch (s->dtype) {
        case CLAQ_F32: f = bits_to_float(rd32(p + 4 * i)); break;
        case CLAQ_F16: f = half_to_float(rd16(p + 2 * i)); break;
        case CLAQ_BF16: f = bits_to_float((uint32_t)rd16(p + 2 * i) << 16); break;
        case CLAQ_F64: {
            uint64_t bits = rd64(p + 8 * i);
            double d;
            memcpy(&d, &bits, sizeof d);
            f = (float)d; /* out-of-range values become infinities (IEEE conversion) */
            break;
        }
        case CLAQ_I64: f = (float)to_i64(rd64(p + 8 * i)); break;
        case CLAQ_I32: f = (float)to_i32(rd32(p + 4 * i)); break;
        case CLAQ_I16: f = (float)((int32_t)rd16(p + 2 * i) - (rd16(p + 2 * i) >= 0x8000u ? 65536 : 0)); break;
        case CLAQ_I8: f = (float)((int32_t)p[i] - (p[i] >= 0x80u ? 256 : 0)); break;
        case CLAQ_U8: f = (float)p[i]; break;
        case CLAQ_U16: f = (float)rd16(p + 2 * i); break;
        default: f = (float)rd32(p + 4 * i); break;
        }
        dst[i] = f;
    }
}

claq_status claq_decode_tensor(claq_reader *reader, size_t index, float *dst, size_t dst_count, claq_error *err) {
    claq_tensor_info info;
    claq_status st = claq_check_tensor(reader, index, err);
    if (st) return st;
    claq_tensor_info_at(reader, index, &info);
    if (info.count > (uint64_t)dst_count || !dst)
        return fail(err, CLAQ_INVALID_ARGUMENT, "the buffer holds %lu values, the tensor has %llu",
                    (unsigned long)dst_count, (unsigned long long)info.count);
    if (reader->tensors[index].kind == CLAQ_KIND_CLAQ) decode_claq(reader, &reader->tensors[index], dst);
    else decode_raw(reader, &reader->tensors[index], dst);
    return succeed(err);
}

/* ------------------------------------------------------------------------ step 6: embedded files */

#ifdef CLAQ_WITH_ZLIB
/* Inflates one zlib stream into dst (or, with dst NULL, only counts), never producing more than size + 1
 * bytes; it must give exactly size bytes and end exactly at the end of the input. */
static claq_status inflate_exact(const unsigned char *in, uint64_t in_len, unsigned char *dst, uint64_t size,
                                 const char *qn, claq_error *err) {
    z_stream zs;
    unsigned char scratch[16384];
    uint64_t in_left = in_len, produced = 0;
    const unsigned char *ip = in;
    int ret;
    claq_status st = CLAQ_OK;
    memset(&zs, 0, sizeof zs);
    if (inflateInit(&zs) != Z_OK) return fail(err, CLAQ_OUT_OF_MEMORY, "file %s: cannot start zlib", qn);
    for (;;) {
        unsigned char *op;
        uint64_t room;
        uInt avail;
        if (zs.avail_in == 0 && in_left > 0) {
            uInt chunk = in_left > (1u << 30) ? (1u << 30) : (uInt)in_left;
            zs.next_in = (z_const Bytef *)ip;
            zs.avail_in = chunk;
            ip += chunk;
            in_left -= chunk;
        }
        if (dst && produced < size) {
            op = dst + (size_t)produced;
            room = size - produced;
        } else {
            op = scratch;
            room = size + 1 - produced; /* >= 1: produced <= size here */
            if (room > sizeof scratch) room = sizeof scratch;
        }
        if (room > (1u << 30)) room = 1u << 30;
        avail = (uInt)room;
        zs.next_out = op;
        zs.avail_out = avail;
        ret = inflate(&zs, Z_NO_FLUSH);
        produced += avail - zs.avail_out;
        if (produced > size) {
            st = fail(err, CLAQ_BAD_FILE_DATA, "file %s: inflates to more than its size (%llu bytes)", qn,
                      (unsigned long long)size);
            break;
        }
        if (ret == Z_STREAM_END) {
            if (produced != size)
                st = fail(err, CLAQ_BAD_FILE_DATA, "file %s: inflates to %llu bytes, its size is %llu", qn,
                          (unsigned long long)produced, (unsigned long long)size);
            else if (zs.avail_in != 0 || in_left != 0)
                st = fail(err, CLAQ_BAD_FILE_DATA, "file %s: bytes after the end of the zlib stream", qn);
            break;
        }
        if (ret == Z_OK) continue;
        if (ret == Z_BUF_ERROR && zs.avail_in == 0 && in_left != 0) continue; /* refilled at the top */
        if (ret == Z_MEM_ERROR) st = fail(err, CLAQ_OUT_OF_MEMORY, "file %s: out of memory inflating", qn);
        else if (ret == Z_BUF_ERROR) st = fail(err, CLAQ_BAD_FILE_DATA, "file %s: the zlib stream is truncated", qn);
        else st = fail(err, CLAQ_BAD_FILE_DATA, "file %s: not a valid zlib stream", qn);
        break;
    }
    inflateEnd(&zs);
    return st;
}
#endif

static claq_status check_embedded_crc(claq_reader *r, embedded *f, const char *qn, claq_error *err) {
    char what[120];
    claq_status st;
    if (f->crc_checked) return CLAQ_OK;
    snprintf(what, sizeof what, "file %s", qn);
    st = check_crc(r, f->sec, what, err);
    if (!st) f->crc_checked = 1;
    return st;
}

claq_status claq_read_embedded(claq_reader *reader, size_t index, void *dst, size_t dst_size, claq_error *err) {
    embedded *f;
    char qn[80];
    claq_status st;
    if (!reader || index >= reader->nfiles) return fail(err, CLAQ_INVALID_ARGUMENT, "no file %lu", (unsigned long)index);
    f = &reader->files[index];
    quote(qn, sizeof qn, f->name, f->name_len);
    if (!dst || (uint64_t)dst_size < f->size)
        return fail(err, CLAQ_INVALID_ARGUMENT, "file %s: the buffer is smaller than its %llu bytes", qn,
                    (unsigned long long)f->size);
    st = check_embedded_crc(reader, f, qn, err);
    if (st) return st;
    if (!f->zlib) {
        memcpy(dst, SEC_PTR(reader, f->sec), (size_t)f->size);
        return succeed(err);
    }
#ifdef CLAQ_WITH_ZLIB
    st = inflate_exact(SEC_PTR(reader, f->sec), reader->secs[f->sec].length, (unsigned char *)dst, f->size, qn, err);
    return st ? st : succeed(err);
#else
    return fail(err, CLAQ_NOT_INFLATABLE, "file %s is zlib-encoded and this reader was built without zlib", qn);
#endif
}

/* -------------------------------------------------------------------------- step 7: everything */

claq_status claq_validate(claq_reader *reader, size_t *uninflated, claq_error *err) {
    size_t i, skipped = 0;
    claq_status st;
    if (uninflated) *uninflated = 0;
    if (!reader) return fail(err, CLAQ_INVALID_ARGUMENT, "no reader");
    for (i = 0; i < reader->ntensors; i++) {
        st = claq_check_tensor(reader, i, err);
        if (st) return st;
    }
    for (i = 0; i < reader->nfiles; i++) {
        embedded *f = &reader->files[i];
        char qn[80];
        quote(qn, sizeof qn, f->name, f->name_len);
        st = check_embedded_crc(reader, f, qn, err);
        if (st) return st;
        if (f->zlib) {
#ifdef CLAQ_WITH_ZLIB
            st = inflate_exact(SEC_PTR(reader, f->sec), reader->secs[f->sec].length, NULL, f->size, qn, err);
            if (st) return st;
#else
            skipped++;
#endif
        }
    }
    for (i = 0; i < reader->nsecs; i++) { /* the padding after every section, in file order */
        const section *s = &reader->secs[reader->order[i].index];
        uint64_t end = s->offset + s->length, padded = end, k; /* no overflow: checked by the placement */
        (void)align_up(end, &padded);
        for (k = end; k < padded; k++)
            if (reader->data[k] != 0)
                return fail(err, CLAQ_BAD_LAYOUT, "non-zero padding byte at data offset %llu", (unsigned long long)k);
    }
    if (uninflated) *uninflated = skipped;
    return succeed(err);
}
