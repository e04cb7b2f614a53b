#ifndef THINBD_AIO_H
#define THINBD_AIO_H
#include <libaio.h>
#endif
